"""The daemon as operators see it: the socket API with peer checks, forced refresh, metrics
and health on TCP, sd_notify, and SIGHUP reload. Real sockets, the real fake IMS."""

from __future__ import annotations

import functools
import io
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
from imsd import logs
from imsd.config import RELOAD, ProxySpec, Reload, Settings, load_settings
from imsd.daemon import Daemon
from imsd.fakeims.server import FakeIms

from tests.requirements import need_tool
from tests.support import SECRET, add_client, uds, wait_for, write_cred

pytestmark = pytest.mark.anyio


@pytest.fixture
def running(fake: FakeIms, running: Callable[..., Awaitable[Daemon]]) -> Callable[..., Any]:
    # conftest's starter, plus metrics and health on TCP (an ephemeral port): these tests read
    # them. Asks for ``fake`` first so that the daemon stops before the fake IMS does.
    return functools.partial(running, metrics_address="127.0.0.1:0")


async def test_socket_api(tmp_path: Path, fake: FakeIms, running: Any) -> None:
    write_cred(tmp_path / "creds", "alpha", fake, extra='products = ["aep"]\n')
    write_cred(tmp_path / "creds", "bad", fake, secret="p8e-wrong-00000000000000000")
    d = await running()
    mode = os.stat(d.settings.socket).st_mode & 0o777
    assert mode == 0o660
    async with uds(d) as c:
        listing = (await c.get("/v1/credentials")).json()["credentials"]
        assert [(x["name"], x["state"]) for x in listing] == [
            ("alpha", "valid"),
            ("bad", "expired"),
        ]
        assert "invalid_client" in listing[1]["last_error"]
        assert SECRET not in str(listing)
        doc = (await c.get("/v1/credentials/alpha/token")).json()
        assert doc["access_token"] == (tmp_path / "tokens" / "alpha" / "token").read_text()
        h = (await c.get("/v1/credentials/alpha/headers", params={"product": "aep"})).json()
        assert h["headers"]["x-sandbox-name"] == "prod"
        r = await c.get("/v1/credentials/alpha/headers", params={"product": "cja"})
        assert (r.status_code, r.json()["error"]) == (404, "unknown_product")
        r = await c.get("/v1/credentials/nope/token")
        assert (r.status_code, r.json()["error"]) == (404, "unknown_credential")
        r = await c.get("/v1/credentials/bad/token")
        assert r.status_code == 503
        assert r.json()["error"] == "expired"
        assert "invalid_client" in r.json()["message"]
        r = await c.delete("/v1/credentials/alpha/token")
        assert r.status_code == 405
        assert (await c.get("/livez")).status_code == 200
        r = await c.get("/readyz")
        assert r.status_code == 503
        assert "bad" in r.json()["failing"]
    # The unauthenticated TCP listener counts the failing credentials and names none.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{d.metrics_port}") as m:
        r = await m.get("/readyz")
    assert (r.status_code, r.json()) == (503, {"status": "not ready", "failing": 1})


async def test_disallowed_peer_is_refused(tmp_path: Path, fake: FakeIms, running: Any) -> None:
    stream = io.StringIO()
    logs.configure("info", "json", stream)
    write_cred(tmp_path / "creds", "alpha", fake)
    d = await running(allowed_uids=[65534], allowed_gids=[])
    async with uds(d) as c:
        r = await c.get("/v1/credentials/alpha/token")
    assert (r.status_code, r.json()["error"]) == (403, "forbidden")
    line = next(x for x in stream.getvalue().splitlines() if "api.peer_refused" in x)
    assert f'"uid": {os.getuid()}' in line
    assert f'"pid": {os.getpid()}' in line
    logs.configure("warning", "json")


async def test_reload_reparses_with_a_new_default_ims_url(
    tmp_path: Path, fake: FakeIms, running: Any
) -> None:
    path = write_cred(tmp_path / "creds", "alpha", fake)
    lines = path.read_text().splitlines(True)
    path.write_text("".join(line for line in lines if "ims_url" not in line))
    with FakeIms.in_thread() as other:
        add_client(other)
        d = await running(ims_url=fake.url)
        assert fake.state.request_count() == 1
        current: Settings = d.settings
        d._reload = lambda: current.model_copy(update={"ims_url": other.url})
        await d.reload()
        await wait_for(lambda: other.state.request_count() == 1)
        assert d.supervisor is not None
        record = d.supervisor.store.get("alpha")
        assert record is not None
        assert record.credential is not None
        assert record.credential.ims_url == other.url


async def test_concurrent_forced_refreshes_over_the_socket_make_one_ims_request(
    tmp_path: Path, fake: FakeIms, running: Any
) -> None:
    write_cred(tmp_path / "creds", "alpha", fake)
    now = [time.time()]
    d = await running(clock=lambda: now[0])  # default minimum interval: 30 s
    old = (tmp_path / "tokens" / "alpha" / "token").read_text()
    assert fake.state.request_count("client-a") == 1
    now[0] += 60  # the token is a minute old: a forced refresh is allowed once
    fake.state.hang(1.0)  # keep the single flight open while the first callers arrive
    results: list[tuple[int, str]] = []
    limits = httpx.Limits(max_connections=100)
    transport = httpx.AsyncHTTPTransport(uds=str(d.settings.socket), limits=limits)
    async with httpx.AsyncClient(transport=transport, base_url="http://imsd", timeout=60) as c:

        async def call() -> None:
            r = await c.post("/v1/credentials/alpha/refresh")
            results.append((r.status_code, r.json()["access_token"]))

        # 200 real clients over the socket; a thousand callers are in test_supervisor (the
        # single flight itself, without HTTP) and in the long socket load test.
        async with anyio.create_task_group() as tg:
            for _ in range(200):
                tg.start_soon(call)
    fake.state.hang(0)
    assert fake.state.request_count("client-a") == 2, fake.state.request_log
    assert {status for status, _ in results} == {200}
    tokens = {t for _, t in results}
    assert old not in tokens
    assert tokens == {(tmp_path / "tokens" / "alpha" / "token").read_text()}


async def refused(connect: Callable[[], Awaitable[anyio.abc.ByteStream]]) -> None:
    """Wait until *connect* fails (the daemon keeps accepting until the signal is handled)."""
    with anyio.fail_after(10):
        while True:
            try:
                stream = await connect()
            except OSError:
                return
            await stream.aclose()
            await anyio.sleep(0.02)


async def test_sigterm_drains_requests_in_flight(
    tmp_path: Path, fake: FakeIms, running: Any
) -> None:
    write_cred(tmp_path / "creds", "alpha", fake)
    now = [time.time()]
    d = await running(clock=lambda: now[0], handle_signals=True)
    now[0] += 60  # old enough for a forced refresh
    fake.state.hang(60)  # held at the fake until released below
    answers: list[httpx.Response] = []
    async with anyio.create_task_group() as tg:

        async def refresh() -> None:
            async with uds(d) as c:
                answers.append(await c.post("/v1/credentials/alpha/refresh"))

        tg.start_soon(refresh)
        await wait_for(lambda: fake.state.in_flight == 1)
        os.kill(os.getpid(), signal.SIGTERM)
        socket_path = str(d.settings.socket)
        await refused(lambda: anyio.connect_unix(socket_path))
        await refused(lambda: anyio.connect_tcp("127.0.0.1", d.metrics_port or 0))
        assert not answers  # still in flight while newcomers are refused
        fake.state.hang(0)
    [r] = answers
    assert (r.status_code, r.headers["connection"]) == (200, "close")
    assert r.json()["access_token"] == (tmp_path / "tokens" / "alpha" / "token").read_text()
    await wait_for(lambda: not d.settings.socket.exists())  # run() has returned


async def test_metrics_and_health(tmp_path: Path, fake: FakeIms, running: Any) -> None:
    write_cred(tmp_path / "creds", "alpha", fake)
    d = await running()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{d.metrics_port}") as c:
        text = (await c.get("/metrics")).text
        om = await c.get("/metrics", headers={"Accept": "application/openmetrics-text"})
        assert (await c.get("/readyz")).status_code == 200
        assert (await c.get("/livez")).json() == {"status": "ok"}
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    for name in (
        'imsd_token_refresh_total{credential="alpha",result="success"} 1.0',
        'imsd_token_expiry_timestamp_seconds{credential="alpha"}',
        'imsd_token_last_success_timestamp_seconds{credential="alpha"}',
        'imsd_credential_consecutive_failures{credential="alpha"} 0.0',
        "imsd_token_refresh_duration_seconds_bucket",
        'imsd_credentials{state="valid"} 1.0',
        'imsd_ims_requests_total{code="200"} 1.0',
        'imsd_build_info{version="',
    ):
        assert name in text
    assert "_created" not in text
    promtool = need_tool("promtool", "apt-get install prometheus")
    check = await anyio.run_process(
        [promtool, "check", "metrics"], input=text.encode(), check=False
    )
    assert check.returncode == 0, (check.stdout + check.stderr).decode()
    # A removed credential's series go with it.
    (tmp_path / "creds" / "alpha.toml").unlink()
    await wait_for(lambda: "alpha" not in d.store)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{d.metrics_port}") as c:
        assert 'credential="alpha"' not in (await c.get("/metrics")).text


async def test_sd_notify_sequence(tmp_path: Path, fake: FakeIms, running: Any) -> None:
    write_cred(tmp_path / "creds", "alpha", fake)
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(10)
        env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}
        d = await running(env=env)
        got = [(await anyio.to_thread.run_sync(sock.recv, 4096)).decode() for _ in range(3)]
        assert got[0].startswith("READY=1\nSTATUS=1 credentials: 1 valid")
        assert any("WATCHDOG=1" in g for g in got[1:])
        await d.reload()
        messages: list[str] = []
        while not any(m.startswith("READY=1") for m in messages):
            messages.append((await anyio.to_thread.run_sync(sock.recv, 4096)).decode())
        reloading = next(i for i, m in enumerate(messages) if m.startswith("RELOADING=1"))
        assert "MONOTONIC_USEC=" in messages[reloading]
        assert reloading < next(i for i, m in enumerate(messages) if m.startswith("READY=1"))


async def test_sighup_with_broken_config_keeps_serving(
    tmp_path: Path, fake: FakeIms, running: Any
) -> None:
    stream = io.StringIO()
    logs.configure("info", "json", stream)
    write_cred(tmp_path / "creds", "alpha", fake)
    config = tmp_path / "imsd.toml"
    config.write_text("bogus_key = 1\n")
    d = await running(reload=lambda: load_settings(config, env={}), handle_signals=True)
    os.kill(os.getpid(), signal.SIGHUP)
    await wait_for(lambda: "daemon.reload_failed" in stream.getvalue())
    assert "bogus_key" in stream.getvalue()
    async with uds(d) as c:
        assert (await c.get("/v1/credentials/alpha/token")).status_code == 200
    # A good reload applies; unchanged listeners are not rebound.
    old_port = d.metrics_port
    socket_inode = os.stat(d.settings.socket).st_ino
    current: Settings = d.settings
    d._reload = lambda: current.model_copy(update={"min_refresh_interval": 5.0})
    os.kill(os.getpid(), signal.SIGHUP)
    await wait_for(lambda: d.settings.min_refresh_interval == 5.0)
    assert os.stat(d.settings.socket).st_ino == socket_inode
    assert d.metrics_port == old_port
    logs.configure("warning", "json")


def _changed_value(field: str, tmp_path: Path) -> Any:
    """A valid value different from make_settings' for each setting. A new setting fails
    here until it is given one, and its row in config.RELOAD is then tested."""
    values: dict[str, Any] = {
        "credentials_dir": tmp_path / "creds-2",
        "output_dir": tmp_path / "tokens-2",
        "state_dir": tmp_path / "state-2",
        "socket": tmp_path / "imsd-2.sock",
        "metrics_address": "127.0.0.2:0",
        "ims_url": "http://127.0.0.1:1",
        "log_format": "console",
        "log_level": "error",
        "file_mode": 0o640,
        "file_group": "0",
        "socket_mode": 0o600,
        "socket_group": "0",
        "allowed_uids": [0, 65534],
        "allowed_gids": [65534],
        "min_refresh_interval": 7.0,
        "max_connections": 77,
        "plugin_dirs": [tmp_path],
        "secret_roots": [tmp_path / "vault"],
        "refresh_fraction": 0.7,
        "jitter_fraction": 0.01,
        "min_margin": 0.25,
        "backoff_initial": 0.1,
        "backoff_cap": 0.6,
        "recheck_interval": 0.3,
        "max_concurrent_requests": 4,
        "request_rate": 5.0,
        "request_burst": 3,
        "request_timeout": 5.0,
        "debounce_ms": 300,
        "rescan_interval": 30.0,
        "coordination": "redis://127.0.0.1:1/0",
        "coordination_prefix": "other",
        "coordination_password_file": tmp_path / "redis-password",
        "coordination_password_env": "REDIS_PASSWORD",
        "coordination_lease": 20.0,
        "proxy": [ProxySpec(listen="127.0.0.1:0", credential="alpha", product="aep")],
    }
    assert field in values, f"give the new setting {field!r} a changed value here"
    return values[field]


def _in_effect(d: Daemon, field: str, value: Any) -> bool:
    """Whether the running daemon acts on *value*, read from the component that uses it."""
    api, sup = d._api, d.supervisor
    assert api is not None
    assert sup is not None
    effects: dict[str, Any] = {
        "allowed_uids": lambda: api.allowed_uids == frozenset(value),
        "allowed_gids": lambda: api.allowed_gids == frozenset(value),
        "min_refresh_interval": lambda: api.min_refresh_interval == value,
        "max_connections": lambda: {s.max_connections for s in d._servers.values()} == {value},
        "socket": lambda: d.socket_address == value and value.is_socket(),
        "socket_mode": lambda: os.stat(d.settings.socket).st_mode & 0o777 == value,
        "socket_group": lambda: os.stat(d.settings.socket).st_gid == int(value),
        "metrics_address": lambda: d.metrics_port is not None,
        "log_level": lambda: logging.getLogger().level == logging.ERROR,
        "ims_url": lambda: d.watcher is not None,
    }
    policy = sup.policy
    if hasattr(policy, field):
        return bool(getattr(policy, field) == value)
    return bool(effects[field]()) if field in effects else True


async def test_reload_applies_or_warns_for_every_setting(
    tmp_path: Path, fake: FakeIms, running: Any
) -> None:
    """SIGHUP either applies a setting or keeps it and names it in a warning, as the one
    table config.RELOAD says, for every field of Settings."""
    stream = io.StringIO()
    write_cred(tmp_path / "creds", "alpha", fake)
    target: dict[str, Settings] = {}
    d = await running(reload=lambda: target["next"])
    assert set(RELOAD) == set(Settings.model_fields)
    try:
        for field, how in RELOAD.items():
            logs.configure("info", "json", stream)
            stream.seek(0)
            stream.truncate()
            old = getattr(d.settings, field)
            value = _changed_value(field, tmp_path)
            assert value != old, field
            target["next"] = d.settings.model_copy(update={field: value})
            await d.reload()
            warnings = [x for x in stream.getvalue().splitlines() if "reload_needs_restart" in x]
            if how is Reload.APPLIED:
                assert getattr(d.settings, field) == value, field
                assert warnings == [], field
                assert _in_effect(d, field, value), field
            else:
                assert getattr(d.settings, field) == old, field
                assert len(warnings) == 1, field
                assert f'"{field}"' in warnings[0], field
        async with uds(d) as c:  # still serving, on the socket of the last change
            assert (await c.get("/livez")).status_code == 200
    finally:
        logs.configure("warning", "json")
