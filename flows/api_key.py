"""The endpoint's API key, read where the run starts: a Prefect Secret block or an environment variable.

The key is held in memory only: it is never a flow parameter, never logged and never written.
"""

from __future__ import annotations

from prefect.blocks.system import Secret

from tasks.config import EndpointConfig
from tasks.endpoint.client import api_key
from tasks.errors import ConfigError


async def load_api_key(config: EndpointConfig) -> str | None:
    """The key: from the Prefect Secret block --api-key-secret names (for every replica), else from
    --api-key-env's variable; None when the replicas each have their own variable (tasks/endpoint/
    client.py's ``api_keys`` reads them)."""
    if config.api_key_secret is None:
        return api_key(config) if len(set(config.api_key_envs)) == 1 else None
    try:
        block: Secret[str] = await Secret.aload(config.api_key_secret)
    except ValueError as exc:
        raise ConfigError(
            f"--api-key-secret: no Prefect Secret block named {config.api_key_secret!r} ({exc})"
        ) from None
    value = block.get()
    return str(value) if value else None
