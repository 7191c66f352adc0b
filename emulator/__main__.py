"""``python -m emulator [flags]``: serve until Ctrl-C / SIGTERM.

Prints exactly one line to stdout once listening: ``emulator listening on http://HOST:PORT/v1``.
"""

from __future__ import annotations

from collections.abc import Sequence

from emulator.arguments import settings_from_args
from emulator.runner import serve


def _announce(line: str) -> None:
    print(line, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    serve(settings_from_args(argv), announce=_announce)


if __name__ == "__main__":
    main()
