from __future__ import annotations

from pathlib import Path

import pytest
from imsd.config import ConfigError, Settings, load_settings


def test_layers_flag_over_env_over_file(tmp_path: Path) -> None:
    config = tmp_path / "imsd.toml"
    config.write_text('output_dir = "/from/file"\nlog_level = "debug"\nfile_mode = "0640"\n')
    env = {"IMSD_OUTPUT_DIR": "/from/env", "IMSD_BACKOFF_CAP": "60", "UNRELATED": "x"}
    s = load_settings(config, env=env, overrides={"output_dir": Path("/from/flag")})
    assert s.output_dir == Path("/from/flag")
    assert s.backoff_cap == 60
    assert s.log_level == "debug"
    assert s.file_mode == 0o640


def test_defaults_without_any_file(tmp_path: Path) -> None:
    s = load_settings(None, env={"IMSD_CONFIG": ""})
    assert s == Settings()
    assert s.refresh_policy().refresh_fraction == 0.8


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("bogus = 1\n", "bogus"),
        ("refresh_fraction = 1.5\n", "refresh_fraction"),
        ('file_mode = "rw"\n', "file_mode"),
        ("output_dir = [\n", "invalid TOML"),
        ("backoff_initial = 500.0\n", "backoff_initial"),
        ('file_group = "no-such-group-imsd"\n', "file_group"),
    ],
)
def test_errors_name_source_and_key(tmp_path: Path, text: str, needle: str) -> None:
    config = tmp_path / "imsd.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(config, env={})
    assert needle in str(err.value)
    if needle != "backoff_initial" and needle != "file_group":
        assert str(config) in str(err.value)


def test_env_error_names_env(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"environment \(IMSD_\*\): max_concurrent_requests"):
        load_settings(None, env={"IMSD_MAX_CONCURRENT_REQUESTS": "zero"})


def test_named_config_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.toml", env={})
