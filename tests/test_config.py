from pathlib import Path

import pytest

from tasks.config import OPTIONS, RunConfig, build_config, env_name
from tasks.errors import ConfigError

BASE = {"images": "in.parquet", "out": "out"}


def test_defaults_match_the_contract() -> None:
    cfg = build_config(BASE, environ={})
    assert cfg.endpoint.base_url == "http://localhost:8000/v1"
    assert cfg.endpoint.model == "google/gemma-4-31b-it"
    assert cfg.endpoint.api_key_env == "VLMBATCH_API_KEY"
    assert cfg.endpoint.api == "chat"
    assert cfg.endpoint.concurrency == 32
    assert cfg.endpoint.max_retries == 6
    assert cfg.generation.reasoning is None  # unset: nothing is sent, the server's default holds
    assert cfg.image.max_soft_tokens == 280
    assert cfg.image.max_pixels == 2304 * 280
    assert cfg.image.image_urls == "fetch"


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    toml = tmp_path / "vlmbatch.toml"
    toml.write_text('model = "from-file"\nconcurrency = 4\nmax-soft-tokens = 560\nseed = 7\n')
    env = {"VLMBATCH_MODEL": "from-env", "VLMBATCH_CONCURRENCY": "8"}
    cfg = build_config({**BASE, "model": "from-flag"}, environ=env, config_file=toml)
    assert cfg.endpoint.model == "from-flag"
    assert cfg.endpoint.concurrency == 8  # env beats file
    assert cfg.image.max_soft_tokens == 560  # file beats default (dashed key accepted)
    assert cfg.generation.seed == 7
    assert cfg.generation.temperature is None  # default


def test_every_option_has_an_env_variable() -> None:
    for option in OPTIONS:
        assert env_name(option) == "VLMBATCH_" + option.upper()
    cfg = build_config(BASE, environ={"VLMBATCH_CARRY": "a, b", "VLMBATCH_REASONING": "true"})
    assert cfg.carry == ("a", "b")
    assert cfg.generation.reasoning is True


def test_reasoning_off_given_anywhere_is_told_from_reasoning_unset(tmp_path: Path) -> None:
    """--no-reasoning, VLMBATCH_REASONING=false and reasoning = false in TOML all say "off" (sent as
    enable_thinking false); only an unset option leaves the server's default."""
    toml = tmp_path / "vlmbatch.toml"
    toml.write_text("reasoning = false\n")
    assert build_config({**BASE, "reasoning": False}, environ={}).generation.reasoning is False
    assert build_config(BASE, environ={"VLMBATCH_REASONING": "false"}).generation.reasoning is False
    assert build_config(BASE, environ={}, config_file=toml).generation.reasoning is False
    on = build_config({**BASE, "reasoning": True}, environ={}, config_file=toml)
    assert on.generation.reasoning is True  # the flag beats the file
    assert build_config(BASE, environ={"VLMBATCH_REASONING": ""}).generation.reasoning is None


def test_bad_value_names_the_option_and_where_it_came_from() -> None:
    with pytest.raises(
        ConfigError, match=r"VLMBATCH_CONCURRENCY: .*must be a number from 1 to 4096, or auto"
    ):
        build_config(BASE, environ={"VLMBATCH_CONCURRENCY": "0"})
    with pytest.raises(ConfigError, match=r"option --max-soft-tokens"):
        build_config({**BASE, "max_soft_tokens": -1}, environ={})
    with pytest.raises(ConfigError, match=r"option --base-url.*http"):
        build_config({**BASE, "base_url": "localhost:8000"}, environ={})
    with pytest.raises(ConfigError, match=r"--out is required"):
        build_config({"images": "x"}, environ={})


def test_unknown_or_broken_config_file(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("concurency = 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'concurency'"):
        build_config(BASE, environ={}, config_file=toml)
    toml.write_text("model = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        build_config(BASE, environ={}, config_file=toml)
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(BASE, environ={}, config_file=tmp_path / "missing.toml")


def test_config_rejects_unknown_fields_and_holds_no_secret() -> None:
    with pytest.raises(Exception, match="extra"):
        RunConfig.model_validate({**BASE, "api_key": "sk-123"})
    dumped = build_config(BASE, environ={"VLMBATCH_API_KEY": "sk-secret"}).model_dump_json()
    assert "sk-secret" not in dumped


def test_a_key_given_as_api_key_env_is_refused_and_never_echoed() -> None:
    with pytest.raises(ConfigError) as err:
        build_config({**BASE, "api_key_env": "sk-live-0123456789"}, environ={})
    assert "not the key itself" in str(err.value) and "0123456789" not in str(err.value)
    assert (
        build_config({**BASE, "api_key_env": "AZURE_ML_TOKEN"}, environ={}).endpoint.api_key_env
        == "AZURE_ML_TOKEN"
    )


def test_concurrency_auto() -> None:
    cfg = build_config({**BASE, "concurrency": "auto", "max_concurrency": 40}, environ={})
    assert cfg.endpoint.concurrency == "auto" and cfg.endpoint.in_flight_cap == 40
    assert build_config({**BASE, "concurrency": "12"}, environ={}).endpoint.in_flight_cap == 12
    with pytest.raises(ConfigError, match="or auto"):
        build_config({**BASE, "concurrency": "lots"}, environ={})


def test_the_flow_parameter_schema_marks_the_date_as_a_date() -> None:
    """So the Prefect UI's run form offers a date picker and rejects what is not one."""
    from prefect.utilities.callables import parameter_schema

    from flows.annotate import annotate

    schema = parameter_schema(annotate.fn).model_dump()
    date = schema["definitions"]["RunConfig"]["properties"]["date"]
    assert {"type": "string", "format": "date"} in date["anyOf"]
