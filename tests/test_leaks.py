"""The secret-leak audit: one full run of the real daemon per log format, at debug level, with
every auth method and every error path, then a search of everything it wrote or answered for
every secret, token, refresh token and private-key fragment involved. Zero hits."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from imsd.fakeims.server import FakeIms

from tests.support import ORG, TECH, certificate, private_pem, rsa_key

S2S_SECRET = "p8e-LeakAuditS2SSecret0123456789"
PLAIN_SECRET = "NoPatternSecret-7f3a9c2e41d8b605"  # not shaped like anything a regex knows
JWT_SECRET = "JwtClientSecret-5b8e2d71c9a04f36"
WEB_SECRET = "WebClientSecret-a1c3e5f7092b4d68"
PASSPHRASE = "correct horse battery staple 42"
WRONG_SECRET = "WrongSecretValue-0000111122223333"
FIELD_SECRET = "SecretInAWrongField-99887766"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def fake() -> Iterator[FakeIms]:
    # Not conftest's: one client per auth method, each with a secret of its own to look for.
    with FakeIms.in_thread() as f:
        f.state.add_client("s2s", secrets=[S2S_SECRET], scopes=["openid"], org_id=ORG)
        f.state.add_client("plain", secrets=[PLAIN_SECRET], scopes=["openid"], org_id=ORG)
        f.state.add_client(
            "jwt",
            secrets=[JWT_SECRET],
            scopes=[],
            org_id=ORG,
            technical_account_id=TECH,
            public_keys=[certificate(rsa_key())],
            metascopes=["ent_dataservices_sdk"],
        )
        f.state.add_client("web", secrets=[WEB_SECRET], scopes=["openid"], org_id=ORG)
        yield f


def write_credentials(creds: Path, fake: FakeIms) -> list[str]:
    """Every auth method, valid and failing; returns the secrets written."""
    creds.mkdir()
    url = fake.url
    common = f'org_id = "{ORG}"\nims_url = "{url}"\n'
    (creds / "s2s.secret").write_text(S2S_SECRET)
    (creds / "s2s.toml").write_text(
        f'client_id = "s2s"\nclient_secret_file = "s2s.secret"\nscopes = ["openid"]\n{common}'
        'products = ["aep", "analytics"]\n[product.analytics]\ncompany_id = "acme"\n'
    )
    (creds / "plain.toml").write_text(
        f'client_id = "plain"\nclient_secret_env = "PLAIN_SECRET"\nscopes = ["openid"]\n{common}'
    )
    (creds / "wrong.toml").write_text(
        f'client_id = "s2s"\nclient_secret = "{WRONG_SECRET}"\nscopes = ["openid"]\n{common}'
    )
    key = private_pem(rsa_key(), PASSPHRASE.encode())
    (creds / "jwt.key").write_bytes(key)
    (creds / "jwt.pass").write_text(PASSPHRASE)
    (creds / "jwt.toml").write_text(
        f'auth = "jwt"\nclient_id = "jwt"\nclient_secret = "{JWT_SECRET}"\n{common}'
        f'technical_account_id = "{TECH}"\nmetascopes = ["ent_dataservices_sdk"]\n'
        'private_key_file = "jwt.key"\nprivate_key_passphrase_file = "jwt.pass"\n'
    )
    (creds / "badkey.key").write_bytes(private_pem(rsa_key(1)))
    (creds / "badkey.toml").write_text(
        f'auth = "jwt"\nclient_id = "jwt"\nclient_secret = "{JWT_SECRET}"\n{common}'
        f'technical_account_id = "{TECH}"\nmetascopes = ["ent_dataservices_sdk"]\n'
        'private_key_file = "badkey.key"\n'
    )
    seed = fake.state.login("web", ["openid"])
    (creds / "user.rt").write_text(seed)
    (creds / "user.toml").write_text(
        f'auth = "refresh_token"\nclient_id = "web"\nclient_secret = "{WEB_SECRET}"\n{common}'
        'refresh_token_file = "user.rt"\n'
    )
    revoked = fake.state.login("web", ["openid"])
    (creds / "revoked.rt").write_text(revoked)
    (creds / "revoked.toml").write_text(
        f'auth = "refresh_token"\nclient_id = "web"\nclient_secret = "{WEB_SECRET}"\n{common}'
        'refresh_token_file = "revoked.rt"\n'
    )
    (creds / "broken.toml").write_text(
        f'client_id = "s2s"\nclient_secret = ["{FIELD_SECRET}"]\norg_id = 7\n'
    )
    (creds / "garbage.json").write_text('{"client_secret": "' + FIELD_SECRET + '", ')
    pem_lines = [line for line in key.decode().splitlines() if "-----" not in line]
    bad_lines = [
        line for line in private_pem(rsa_key(1)).decode().splitlines() if "-----" not in line
    ]
    return [
        S2S_SECRET,
        PLAIN_SECRET,
        JWT_SECRET,
        WEB_SECRET,
        PASSPHRASE,
        WRONG_SECRET,
        FIELD_SECRET,
        seed,
        revoked,
        *pem_lines[1:-1],  # key fragments (full base64 lines)
        *bad_lines[1:-1],
    ]


def wait_until(predicate: object, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("fmt", ["json", "console", "journald"])
def test_no_secret_anywhere(tmp_path: Path, fake: FakeIms, fmt: str) -> None:
    secrets = write_credentials(tmp_path / "creds", fake)
    fake.state.revoke_refresh_tokens("web")  # both chains dead…
    seed = fake.state.login("web", ["openid"])  # …then a fresh login for "user"
    (tmp_path / "creds" / "user.rt").write_text(seed)
    secrets.append(seed)
    sock, port = tmp_path / "imsd.sock", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMSD_")}
    env.update(PLAIN_SECRET=PLAIN_SECRET, IMSD_MIN_REFRESH_INTERVAL="0")
    args = [
        sys.executable,
        "-m",
        "imsd",
        "run",
        "--credentials-dir",
        str(tmp_path / "creds"),
        "--output-dir",
        str(tmp_path / "tokens"),
        "--state-dir",
        str(tmp_path / "state"),
        "--socket",
        str(sock),
        "--metrics-address",
        f"127.0.0.1:{port}",
        "--log-format",
        fmt,
        "--log-level",
        "debug",
    ]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    answers: list[str] = []
    served: list[str] = []  # token documents: access tokens are their point, nothing else
    try:
        wait_until(lambda: (tmp_path / "tokens" / "user" / "token").exists())
        wait_until(lambda: (tmp_path / "tokens" / "jwt" / "token").exists())
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
        environ_visible = Path(f"/proc/{proc.pid}/environ").stat().st_mode & 0o004
        transport = httpx.HTTPTransport(uds=str(sock))
        with httpx.Client(transport=transport, base_url="http://imsd", timeout=30) as c:
            for _ in range(2):  # rotations of the refresh token, forced refreshes of the rest
                for name in ("s2s", "plain", "jwt", "user", "wrong", "badkey", "revoked"):
                    served.append(c.post(f"/v1/credentials/{name}/refresh").text)
            for path in (
                "/v1/credentials",
                "/v1/credentials/wrong/token",
                "/v1/credentials/nope/token",
                "/v1/credentials/s2s/headers?product=nope",
                "/v1/credentials/../../etc/passwd",
            ):
                answers.append(c.get(path).text)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as m:
            answers.append(m.get("/metrics").text)
            answers.append(m.get("/readyz").text)
        status = subprocess.run(
            [sys.executable, "-m", "imsd", "status", "--socket", str(sock)],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
            check=False,
        )
        answers += [status.stdout, status.stderr]
        # A credential changing while running, and a broken file becoming valid.
        (tmp_path / "creds" / "broken.toml").unlink()
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()[-2000:]
    logs = out.decode() + err.decode()
    assert "token.refreshed" in logs
    assert "invalid_signature" in logs
    assert "new login is needed" in logs
    assert "credential.invalid" in logs
    # Everything the daemon said or wrote, except its own token outputs and state (0600).
    haystack = [logs, cmdline, *answers]
    for found in tmp_path.rglob("*"):
        if found.is_file() and not found.is_relative_to(tmp_path / "creds"):
            if found.is_relative_to(tmp_path / "tokens") or found.is_relative_to(
                tmp_path / "state"
            ):
                assert found.stat().st_mode & 0o077 == 0, f"{found} is readable by others"
                continue
            haystack.append(found.read_bytes().decode("utf-8", "replace"))
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    every = [*secrets, *fake.state.minted]
    assert len(fake.state.minted) >= 8
    for text in haystack:
        for secret in every:
            assert secret not in text, f"a secret ({secret[:6]}…) leaked"
    for text in served:
        for secret in secrets:
            assert secret not in text, f"a secret ({secret[:6]}…) leaked in a token document"
    assert any("invalid_signature" in text for text in served)
    assert not environ_visible
    assert "Secret(" not in logs or "**********" in logs  # reprs, if any, are masked
    # The status table is useful, not empty.
    assert "revoked" in status.stdout
    assert json.loads(answers[0])["credentials"]
