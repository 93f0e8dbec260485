"""The ``imsd`` command as a user runs it: real subprocesses, real files, the real fake IMS."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from imsd.fakeims.server import FakeIms

ORG = "0123456789ABCDEF01234567@AdobeOrg"
SECRET = "p8e-CliSecretValue0123456789abcdef"


def imsd(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imsd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest.fixture
def fake() -> Iterator[FakeIms]:
    with FakeIms.in_thread() as f:
        f.state.add_client("cli-client", secrets=[SECRET], scopes=["openid"], org_id=ORG)
        yield f


def cred(directory: Path, name: str, ims_url: str, secret_env: str = "CLI_SECRET") -> Path:
    directory.mkdir(exist_ok=True)
    path = directory / f"{name}.toml"
    path.write_text(
        f'auth = "oauth_server_to_server"\nclient_id = "cli-client"\n'
        f'client_secret_env = "{secret_env}"\norg_id = "{ORG}"\nscopes = ["openid"]\n'
        f'ims_url = "{ims_url}"\n'
    )
    return path


def test_check_valid_and_invalid(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    cred(creds, "ok", "https://ims-na1.adobelogin.com")
    r = imsd("check", "--credentials-dir", str(creds), env={"CLI_SECRET": SECRET})
    assert r.returncode == 0, r.stderr
    (creds / "bad.json").write_text(
        json.dumps(
            {
                "auth": "oauth_server_to_server",
                "client_id": "x",
                "client_secret": SECRET,
                "org_id": "nope",
                "scopes": ["openid"],
            }
        )
    )
    r = imsd("check", "--credentials-dir", str(creds), env={"CLI_SECRET": SECRET})
    assert r.returncode == 1
    assert "bad.json" in r.stderr
    assert "org_id" in r.stderr
    assert SECRET not in r.stderr + r.stdout


def test_once_writes_and_reports(tmp_path: Path, fake: FakeIms) -> None:
    creds, out = tmp_path / "creds", tmp_path / "out"
    cred(creds, "svc", fake.url)
    args = (
        "once",
        "--credentials-dir",
        str(creds),
        "--output-dir",
        str(out),
        "--state-dir",
        str(tmp_path / "state"),
        "--log-format",
        "json",
    )
    r = imsd(*args, env={"CLI_SECRET": SECRET})
    assert r.returncode == 0, r.stderr
    token = (out / "svc" / "token").read_text()
    assert fake.state.validate_token(token) is not None
    assert token not in r.stderr
    assert SECRET not in r.stderr
    r = imsd(*args, env={"CLI_SECRET": "p8e-wrong-000000000000000000"})
    assert r.returncode == 1
    assert "invalid_client" in r.stderr


def test_config_error_names_source(tmp_path: Path) -> None:
    config = tmp_path / "imsd.toml"
    config.write_text("refresh_fraction = 2\nbogus = 1\n")
    r = imsd("check", "--config", str(config))
    assert r.returncode == 2
    assert str(config) in r.stderr
    assert "refresh_fraction" in r.stderr


def test_demo_prints_a_working_curl_line() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "imsd", "demo", "--log-format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines: queue.Queue[str] = queue.Queue()
        stdout = proc.stdout

        def pump() -> None:
            for line in stdout:
                lines.put(line)

        threading.Thread(target=pump, daemon=True).start()
        seen: list[str] = []
        while not any("try:" in line for line in seen):
            seen.append(lines.get(timeout=60))
        curl = next(line for line in seen if "try:" in line).split("try:", 1)[1].strip()
        demo_dir = Path(curl.split("@", 1)[1].split()[0]).parents[2]
        assert re.fullmatch(r"curl -sS -H @\S+/generic\.headers http://127\.0\.0\.1:\d+/\S+", curl)
        r = subprocess.run(
            [*curl.split(), "--fail-with-body"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(r.stdout)["ok"] is True
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert demo_dir.name.startswith("imsd-demo-")
    assert not demo_dir.exists()  # its secret, state and tokens went with it


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("alpha", "alpha"),
        ("\x1b[2J\x1b]0;pwned\x07x", "\\x1b[2J\\x1b]0;pwned\\x07x"),
        ("a\nb\rc\td", "a\\nb\\rc\\td"),
        ("caf\u00e9 \u2192 ok", "caf\u00e9 \u2192 ok"),
    ],
)
def test_status_never_prints_control_characters(raw: str, shown: str) -> None:
    from imsd.cli import printable

    assert printable(raw) == shown
    assert all(c.isprintable() for c in printable(raw))
