"""End to end, in process: a credentials directory, the real fake IMS over loopback HTTP, the
daemon's task group, and the token files on disk."""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from imsd import logs
from imsd.daemon import run_once
from imsd.fakeims.server import FakeIms
from imsd.model import CredentialState
from imsd.registry import load_registry

from tests.support import ORG, SECRET, SECRET2, live, make_settings, read, sup, wait_for, write_cred

pytestmark = pytest.mark.anyio


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    logs.configure("debug", "json", stream)
    yield stream
    logs.configure("warning", "json")


async def test_add_change_remove(tmp_path: Path, fake: FakeIms, daemon: Any) -> None:
    s = make_settings(tmp_path)
    write_cred(s.credentials_dir, "alpha", fake)
    d = await daemon(s)
    out = s.output_dir / "alpha"
    token = (out / "token").read_text()
    assert fake.state.validate_token(token) is not None
    assert not token.endswith("\n")
    doc = json.loads((out / "token.json").read_text())
    assert doc["access_token"] == token
    assert doc["credential"] == "alpha"
    assert doc["headers"]["generic"]["Authorization"] == f"Bearer {token}"
    headers = (out / "generic.headers").read_text().splitlines()
    assert headers == [
        f"Authorization: Bearer {token}",
        "x-api-key: client-a",
        f"x-gw-ims-org-id: {ORG}",
    ]
    assert f"ADOBE_ACCESS_TOKEN={token}" in (out / "generic.env").read_text().splitlines()
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o600

    # A second credential appears within a debounce.
    write_cred(s.credentials_dir, "beta", fake, client_id="client-b")
    await wait_for(lambda: (s.output_dir / "beta" / "token").exists())

    # Headers-only change: files re-rendered from the same token, no IMS request.
    before = fake.state.request_count("client-a")
    write_cred(s.credentials_dir, "alpha", fake, extra='[extra_headers]\n"x-team" = "billing"\n')
    await wait_for(lambda: "x-team: billing" in (read(out / "generic.headers") or ""))
    assert (out / "token").read_text() == token
    assert fake.state.request_count("client-a") == before

    # Secret rotation: identity changed, a new token is fetched at once.
    write_cred(s.credentials_dir, "alpha", fake, secret=SECRET2)
    await wait_for(lambda: read(out / "token") not in (None, token))

    # Removal removes the directory.
    (s.credentials_dir / "beta.toml").unlink()
    await wait_for(lambda: not (s.output_dir / "beta").exists())
    assert "beta" not in sup(d).store


async def test_kubernetes_secret_volume_swap(tmp_path: Path, fake: FakeIms, daemon: Any) -> None:
    s = make_settings(tmp_path)
    vol = s.credentials_dir

    def publish(version: str, secret: str) -> None:
        data = vol / f"..{version}"
        data.mkdir()
        write_cred(data, "svc", fake, secret=secret)
        # The secret file path inside must be stable: point it at the ..data link.
        text = (data / "svc.toml").read_text().replace(str(data), str(vol / "..data"))
        (data / "svc.toml").write_text(text)
        tmp_link = vol / "..data_tmp"
        tmp_link.symlink_to(data.name)
        os.replace(tmp_link, vol / "..data")
        for f in ("svc.toml", "svc.secret"):
            if not (vol / f).is_symlink():
                (vol / f).symlink_to(f"..data/{f}")

    publish("2026_11_25_01", SECRET)
    await daemon(s)
    token = (s.output_dir / "svc" / "token").read_text()
    publish("2026_11_25_02", SECRET2)
    shutil.rmtree(vol / "..2026_11_25_01")
    await wait_for(lambda: read(s.output_dir / "svc" / "token") not in (None, token))


async def test_invalid_file_beside_valid_and_last_good_kept(
    tmp_path: Path, fake: FakeIms, daemon: Any
) -> None:
    s = make_settings(tmp_path)
    (s.credentials_dir / "broken.toml").write_text('auth = "oauth_server_to_server"\nclient_id =')
    write_cred(s.credentials_dir, "good", fake)
    d = await daemon(s)
    token = (s.output_dir / "good" / "token").read_text()
    broken = live(d, "broken")
    assert broken is not None
    assert broken.state(0) is CredentialState.INVALID
    assert "broken.toml" in (broken.error() or "")

    (s.credentials_dir / "good.toml").write_text('auth = "oauth_server_to_server"\n')
    entry = live(d, "good")
    assert entry is not None
    await wait_for(lambda: entry.file_error is not None)
    assert entry.file_error is not None
    assert "good.toml" in entry.file_error
    assert (s.output_dir / "good" / "token").read_text() == token
    assert entry.credential is not None
    assert entry.grant is not None


async def test_outage_serves_last_token_until_expiry_then_recovers(
    tmp_path: Path, fake: FakeIms, daemon: Any
) -> None:
    fake.state.token_lifetime = 3.0
    s = make_settings(tmp_path, min_margin=0.5, refresh_fraction=0.5)
    write_cred(s.credentials_dir, "alpha", fake)
    d = await daemon(s)
    out = s.output_dir / "alpha" / "token"
    first = out.read_text()
    entry = live(d, "alpha")
    assert entry is not None
    fake.state.fail_next(10_000, status=503)
    await wait_for(lambda: entry.consecutive_failures >= 2)
    assert entry.state(time.time()) in (CredentialState.STALE, CredentialState.EXPIRED)
    assert out.read_text() == first  # never replaced by nothing
    await wait_for(lambda: entry.state(time.time()) is CredentialState.EXPIRED)
    assert out.read_text() == first
    fake.state.fail_next(0)
    await wait_for(lambda: read(out) not in (None, first))
    assert entry.state(time.time()) is CredentialState.VALID


async def test_throttled_honours_retry_after(tmp_path: Path, fake: FakeIms, daemon: Any) -> None:
    fake.state.throttle_next(1, retry_after=1)
    s = make_settings(tmp_path, backoff_cap=2.0)  # Retry-After is capped at the backoff cap
    write_cred(s.credentials_dir, "alpha", fake)
    await daemon(s)
    await wait_for(lambda: (s.output_dir / "alpha" / "token").exists())
    log = [r for r in fake.state.request_log if r.client_id == "client-a"]
    assert [r.status for r in log[:2]] == [429, 200]
    assert log[1].time - log[0].time >= 0.9


async def test_permanent_error_is_not_hammered(tmp_path: Path, fake: FakeIms, daemon: Any) -> None:
    s = make_settings(tmp_path, backoff_cap=300.0)
    write_cred(s.credentials_dir, "alpha", fake, secret="p8e-wrong-secret-000000000000")
    d = await daemon(s)
    entry = live(d, "alpha")
    assert entry is not None
    assert entry.last_error is not None
    assert "invalid_client" in entry.last_error
    await anyio.sleep(0.5)
    assert fake.state.request_count("client-a") == 1
    # Fixing the file retries at once.
    write_cred(s.credentials_dir, "alpha", fake)
    await wait_for(lambda: (s.output_dir / "alpha" / "token").exists())


async def test_once_exit_codes(tmp_path: Path, fake: FakeIms) -> None:
    s = make_settings(tmp_path)
    write_cred(s.credentials_dir, "alpha", fake)
    assert await run_once(s, load_registry(), give_up_after=10) == 0
    assert (s.output_dir / "alpha" / "token").exists()
    write_cred(s.credentials_dir, "beta", fake, secret="p8e-wrong-secret-000000000000")
    assert await run_once(s, load_registry(), give_up_after=10) == 1


async def test_once_fails_on_an_empty_directory_unless_allowed(
    tmp_path: Path, log_stream: io.StringIO
) -> None:
    """README "Running it": 1 when any failed or none found. An init container whose
    credentials mount is wrong must not succeed with nothing written."""
    s = make_settings(tmp_path)
    (s.credentials_dir / "notes.txt").write_text("not a credential\n")
    assert await run_once(s, load_registry(), give_up_after=10) == 1
    assert '"event": "once.empty"' in log_stream.getvalue()
    assert '"level": "error"' in log_stream.getvalue()
    assert await run_once(s, load_registry(), give_up_after=10, allow_empty=True) == 0


async def test_no_secret_in_logs(
    tmp_path: Path, fake: FakeIms, daemon: Any, log_stream: io.StringIO
) -> None:
    s = make_settings(tmp_path)
    write_cred(s.credentials_dir, "alpha", fake)
    write_cred(s.credentials_dir, "bad", fake, client_id="client-b", secret=SECRET2)
    d = await daemon(s)
    tokens = {(s.output_dir / "alpha" / "token").read_text()}
    write_cred(s.credentials_dir, "alpha", fake, secret=SECRET2)
    await wait_for(lambda: read(s.output_dir / "alpha" / "token") not in (None, *tokens))
    tokens.add((s.output_dir / "alpha" / "token").read_text())
    (s.credentials_dir / "alpha.toml").write_text(f'client_secret = "{SECRET}"\nbogus =')
    entry = live(d, "alpha")
    assert entry is not None
    await wait_for(lambda: entry.file_error is not None)
    captured = log_stream.getvalue()
    assert "token.refreshed" in captured
    assert "invalid_client" in captured
    for secret in (SECRET, SECRET2, *tokens):
        assert secret not in captured
