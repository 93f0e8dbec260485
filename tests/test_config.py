from __future__ import annotations

from pathlib import Path

import pytest
from imsd.config import ConfigError, Settings, load_settings
from imsd.model import https_or_loopback


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


ORG = "0123456789ABCDEF01234567@AdobeOrg"
CRED = f'client_id = "cid"\nclient_secret_env = "S"\norg_id = "{ORG}"\nscopes = ["openid"]\n'


CONFIG_DOC = "not a known key; see the README's configuration reference"
CRED_DOC = "not a known key; see the README's credential file section"


@pytest.mark.parametrize(
    ("kind", "key", "hint"),
    [
        ("config", "ouput_dir", "did you mean 'output_dir'?"),
        ("config", "log_levle", "did you mean 'log_level'?"),
        ("config", "zzz", CONFIG_DOC),
        ("credential", "clientid", "did you mean 'client_id'?"),
        ("credential", "org", "did you mean 'org_id'?"),
        ("credential", "private_kye_file", "did you mean 'private_key_file'?"),  # a jwt field
        ("credential", "zzz", CRED_DOC),
    ],
)
def test_unknown_keys_have_one_wording_in_config_and_credential_files(
    tmp_path: Path, kind: str, key: str, hint: str
) -> None:
    """The config file and a credential file word an unknown key alike: ``unknown key 'K'``
    then ``did you mean 'KEY'?`` (difflib) or where the keys are documented, each in its
    family's frame (the CLI's ``what (where): what to do``; a credential's ``FILE: FIELD:``)."""
    from imsd.credentials import parse_credentials
    from imsd.model import CredentialError

    line = f"{key} = '1'\n"
    if kind == "config":
        path = tmp_path / "imsd.toml"
        path.write_text(line)
        with pytest.raises(ConfigError) as config_error:
            load_settings(path, env={})
        assert str(config_error.value) == f"unknown key '{key}' ({path}): {hint}"
    else:
        path = tmp_path / "c.toml"
        text = CRED + line
        path.write_text(text)
        with pytest.raises(CredentialError) as cred_error:
            parse_credentials(path, text.encode(), env={"S": "secret-value"})
        assert str(cred_error.value) == f"{path}: {key}: unknown key '{key}': {hint}"


def test_env_error_names_env(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\(environment IMSD_MAX_CONCURRENT_REQUESTS\)"):
        load_settings(None, env={"IMSD_MAX_CONCURRENT_REQUESTS": "zero"})


def test_named_config_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.toml", env={})


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("https://user:hunter2-pw@ims.example.com", "user:password@"),
        ("https://hunter2-pw@ims.example.com", "user:password@"),
        ("https://ims.example.com/?k=hunter2-pw", "query"),
        ("https://ims.example.com/#hunter2-pw", "fragment"),
        ("http://ims.example.com", "https://"),
        ("https://ims.example.com:hunter2-pw", "port"),
    ],
)
def test_ims_url_refuses_userinfo_query_fragment(tmp_path: Path, url: str, needle: str) -> None:
    """A password in the daemon's ims_url would be logged with every network error: it is
    refused, from any layer, by an error that does not quote it."""
    config = tmp_path / "imsd.toml"
    config.write_text(f'ims_url = "{url}"\n')
    layers: list[tuple[str, Path | None, dict[str, str], dict[str, str]]] = [
        (str(config), config, {}, {}),
        ("environment", None, {"IMSD_IMS_URL": url, "IMSD_CONFIG": ""}, {}),
        ("--ims-url", None, {"IMSD_CONFIG": ""}, {"ims_url": url}),
    ]
    for source, path, env, overrides in layers:
        with pytest.raises(ConfigError) as err:
            load_settings(path, env=env, overrides=overrides)
        assert f"({source}" in str(err.value)  # "(where..." in the one-line form
        assert "ims_url" in str(err.value)
        assert needle in str(err.value)
        assert "hunter2" not in str(err.value)


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://ims-na1.adobelogin.com", True),
        ("https://10.0.0.1:8443/ims/token/v3", True),
        ("http://127.0.0.1:8765", True),
        ("http://127.8.9.10/x", True),  # all of 127/8 is loopback
        ("http://[::1]:8765", True),
        ("http://LOCALHOST:1", True),
        ("http://ims.example.com", False),
        ("http://10.0.0.1", False),
        ("http://127.0.0.1.nip.io", False),  # a name that merely starts like loopback
        ("http://localhost.example.com", False),
        ("ftp://127.0.0.1", False),
        ("https://", False),
        ("127.0.0.1:8765", False),
    ],
)
def test_the_https_or_loopback_rule(url: str, allowed: bool) -> None:
    assert https_or_loopback(url) is allowed


def test_ims_url_accepts_hosts_and_loopback_http() -> None:
    for url, expected in [
        ("https://ims-na1.adobelogin.com/", "https://ims-na1.adobelogin.com"),
        ("http://127.0.0.1:8765", "http://127.0.0.1:8765"),
        ("http://[::1]:8765", "http://[::1]:8765"),
        ("http://localhost", "http://localhost"),
    ]:
        assert Settings(ims_url=url).ims_url == expected
