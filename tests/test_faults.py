"""Fault injection: IMS outages and throttling storms, kill -9 mid-refresh, a full output disk,
wall-clock jumps, and socket load. Real processes, real sockets, real files.

Long variants (1,000 refreshes under kill -9, 1,000 socket clients for 60 s) carry the
``long`` marker; ``.ci/run`` runs them after ``make test``.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from imsd import scheduler
from imsd.daemon import Daemon, run_once
from imsd.fakeims.server import FakeIms
from imsd.model import Credential, CredentialState, Grant, Secret
from imsd.registry import load_registry
from imsd.schedule import WRITE_RETRY_CAP, RefreshPolicy
from imsd.scheduler import Record

from tests.support import ORG, SCOPES, SECRET, live, make_settings, wait_for, write_cred

pytestmark = pytest.mark.anyio


def entry_of(d: Daemon, name: str) -> Any:
    return live(d, name)


# -- IMS outages ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["503", "hang", "reset"])
async def test_outage_across_two_refresh_windows(
    tmp_path: Path, fake: FakeIms, daemon: Any, fault: str
) -> None:
    """Lifetime 4 s, refresh at 50 %: an outage of ~5 s spans two refresh windows. The file
    always holds the last good token while it is valid; recovery comes within the backoff
    cap of IMS returning; retries are spread (jitter), not a fixed beat."""
    fake.state.token_lifetime = 4.0
    s = make_settings(
        tmp_path, refresh_fraction=0.5, jitter_fraction=0.0, min_margin=0.5, request_timeout=0.5
    )
    write_cred(s.credentials_dir, "alpha", fake)
    d = await daemon(s, env={})
    out = s.output_dir / "alpha" / "token"
    first = out.read_text()
    entry = entry_of(d, "alpha")
    outage_start = time.time()
    if fault == "503":
        fake.state.fail_next(10_000, status=503)
    elif fault == "hang":
        fake.state.hang(5.0)  # longer than request_timeout: every attempt times out
    else:
        fake.state.reset_next(10_000)
    seen_expired = False
    while time.time() - outage_start < 5.0:
        now = time.time()
        assert out.read_text() == first  # never replaced by nothing, nor by garbage
        if entry.grant.expires_at > now + 0.05:
            assert entry.state(now) in (CredentialState.VALID, CredentialState.STALE)
        else:
            seen_expired = True
        await anyio.sleep(0.05)
    assert seen_expired  # the outage outlived the token: both windows missed
    assert entry.consecutive_failures >= 2
    fake.state.fail_next(0)
    fake.state.hang(0)
    fake.state.reset_next(0)
    recovered_from = time.time()
    await wait_for(lambda: out.read_text() != first, limit=s.backoff_cap + 5)
    assert time.time() - recovered_from <= s.backoff_cap + 1.5
    assert entry.state(time.time()) is CredentialState.VALID
    if fault == "503":
        times = [e.time for e in fake.state.request_log if e.status == 503]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert len(gaps) >= 3
        assert max(gaps) <= s.backoff_cap + 0.3  # capped
        assert len({round(g, 2) for g in gaps}) > 1  # jittered, not a fixed beat


async def test_throttling_storm_honours_retry_after_and_the_global_rate(
    tmp_path: Path, fake: FakeIms, daemon: Any
) -> None:
    for i in range(20):
        fake.state.add_client(f"c{i}", secrets=[SECRET], scopes=SCOPES, org_id=ORG)
    fake.state.throttle_next(10, retry_after=1)
    # backoff_cap above the Retry-After, which is capped at it
    s = make_settings(tmp_path, request_rate=10.0, request_burst=2, backoff_cap=2.0)
    for i in range(20):
        write_cred(s.credentials_dir, f"cred{i}", fake, client_id=f"c{i}")
    await daemon(s, env={})
    await wait_for(
        lambda: all((s.output_dir / f"cred{i}" / "token").exists() for i in range(20)), limit=30
    )
    log = list(fake.state.request_log)
    assert sum(e.status == 429 for e in log) == 10
    # Retry-After: 1 s is honoured by every throttled credential.
    by_client: dict[str | None, list[Any]] = {}
    for e in log:
        by_client.setdefault(e.client_id, []).append(e)
    for entries in by_client.values():
        for a, b in itertools.pairwise(entries):
            if a.status == 429:
                assert b.time - a.time >= 0.95
    # The global token bucket (10/s, burst 2): no 1 s window holds more than 10 + 2.
    times = sorted(e.time for e in log)
    for i, t in enumerate(times):
        assert sum(1 for u in times[i:] if u - t < 1.0) <= 12


# -- kill -9 during refreshes --------------------------------------------------------------------


def _daemon_proc(tmp_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
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
            str(tmp_path / "imsd.sock"),
            "--metrics-address",
            "",
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _refresh(sock: Path, name: str) -> bool:
    try:
        with httpx.Client(
            transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://imsd", timeout=5
        ) as c:
            return c.post(f"/v1/credentials/{name}/refresh").status_code == 200
    except httpx.HTTPError:
        return False


def kill9_run(tmp_path: Path, fake: FakeIms, refreshes: int) -> None:
    write_cred(tmp_path / "creds", "alpha", fake)
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMSD_")}
    env["IMSD_MIN_REFRESH_INTERVAL"] = "0"
    token, doc = (
        tmp_path / "tokens" / "alpha" / "token",
        tmp_path / "tokens" / "alpha" / "token.json",
    )
    bad: list[str] = []
    reads = 0
    stop = threading.Event()

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            for path in (token, doc):
                try:
                    data = path.read_bytes()
                except FileNotFoundError:
                    continue
                reads += 1
                if not data or (path is doc and not data.rstrip().endswith(b"}")):
                    bad.append(f"{path.name}: {len(data)} bytes")
                elif path is token and fake.state.validate_token(data.decode()) is None:
                    bad.append("token: not a token the fake minted")

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    rng = random.Random(7)
    done = restarts = 0
    try:
        while done < refreshes:
            proc = _daemon_proc(tmp_path, env)
            threads_: list[threading.Thread] = []
            try:
                before = fake.state.request_count()
                deadline = time.monotonic() + 20
                while not _refresh(tmp_path / "imsd.sock", "alpha"):
                    assert time.monotonic() < deadline, proc.stderr
                    time.sleep(0.02)
                if restarts:  # restart after kill -9: the stored token was reused
                    assert fake.state.request_count() - before == 1  # only the forced one
                else:  # the state file is written within SAVE_INTERVAL of a new token
                    while not (tmp_path / "state" / "state.db").exists():
                        time.sleep(0.05)
                done += 1
                burst = rng.randint(5, 60)
                threads_ += [
                    threading.Thread(target=_refresh, args=(tmp_path / "imsd.sock", "alpha"))
                    for _ in range(4)
                ]
                for _ in range(burst):
                    if _refresh(tmp_path / "imsd.sock", "alpha"):
                        done += 1
                for t in threads_:
                    t.start()
                time.sleep(rng.random() * 0.01)  # kill at a random point, requests in flight
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                for t in threads_:
                    t.join()
            restarts += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert bad == []
    assert reads > 100
    assert restarts >= 3
    leftovers = [p.name for p in (tmp_path / "tokens" / "alpha").iterdir() if ".tmp-" in p.name]
    assert len(leftovers) <= restarts  # a killed write may leave its temp file, nothing else


def test_kill9_during_refreshes(tmp_path: Path, fake: FakeIms) -> None:
    kill9_run(tmp_path, fake, refreshes=100)


@pytest.mark.long
def test_kill9_during_1000_refreshes(tmp_path: Path, fake: FakeIms) -> None:
    kill9_run(tmp_path, fake, refreshes=1000)


# -- a full output disk ------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (root only); the write seam's ENOSPC path is covered in test_sinks."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tokens"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> None:
    """Write *path* until the file system has no byte left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                continue
    finally:
        os.close(fd)


async def test_disk_full_keeps_old_files_and_recovers(
    tmp_path: Path, fake: FakeIms, daemon: Any, small_tmpfs: Path
) -> None:
    s = make_settings(tmp_path, output_dir=small_tmpfs, min_refresh_interval=0.0)
    write_cred(s.credentials_dir, "alpha", fake)
    d = await daemon(s, env={})
    token = small_tmpfs / "alpha" / "token"
    first = token.read_text()
    filler = small_tmpfs / "filler"
    fill(filler)
    assert d.supervisor is not None
    await d.supervisor.refresh("alpha")
    entry = entry_of(d, "alpha")
    assert "writing outputs" in (entry.last_error or "")
    assert "No space left" in (entry.last_error or "")
    assert token.read_text() == first  # the old file untouched
    assert not [p for p in (small_tmpfs / "alpha").iterdir() if ".tmp-" in p.name]
    filler.unlink()
    await wait_for(lambda: token.read_text() != first)
    assert entry.last_error is None


def test_write_retry_waits_seconds_not_the_ims_backoff(tmp_path: Path) -> None:
    """A write retry costs IMS nothing: after many failed writes (ENOSPC) the next one is
    due within WRITE_RETRY_CAP, not the 300 s IMS backoff cap, and never after the token
    expires."""
    c = Credential(
        name="alpha",
        path=tmp_path / "alpha.toml",
        auth="oauth_server_to_server",
        client_id="client-a",
        client_secret=Secret(SECRET),
        org_id=ORG,
        scopes=tuple(SCOPES),
    )
    policy = RefreshPolicy(backoff_cap=300.0)
    for expires, latest in ((1000.0 + 86400, 1000.0 + WRITE_RETRY_CAP), (1002.0, 1002.0)):
        grant = Grant(Secret("t"), "bearer", 900.0, expires)
        rec = Record("alpha", c.path, credential=c, grant=grant, write_attempt=19)
        rec, _ = scheduler.write_failed(rec, grant, "No space left", 1000.0, policy, 0.999)
        assert rec.write_attempt == 20
        assert 1000.0 < rec.write_due <= latest
        assert rec.grant is grant  # the token is kept


async def test_an_output_unsafe_for_env_files_writes_the_rest_and_says_so(
    tmp_path: Path, fake: FakeIms, daemon: Any
) -> None:
    """A client id with a leading quote cannot go into an env file (systemd would unquote
    it, docker not): the token, token.json and headers files are still written, the env file
    is left out, and the credential says so (stale, with the reason) instead of "valid"."""
    fake.state.add_client('"client-q', secrets=[SECRET], scopes=SCOPES, org_id=ORG)
    s = make_settings(tmp_path)
    write_cred(s.credentials_dir, "alpha", fake, client_id='\\"client-q')
    d = await daemon(s, env={})
    out = s.output_dir / "alpha"
    await wait_for(lambda: (out / "token").exists())
    entry = entry_of(d, "alpha")
    await wait_for(lambda: entry.last_error is not None)
    assert sorted(p.name for p in out.iterdir()) == ["generic.headers", "token", "token.json"]
    assert json.loads((out / "token.json").read_text())["client_id"] == '"client-q'
    assert entry.state(time.time()) is CredentialState.STALE
    assert entry.last_error.startswith("writing outputs: generic.env not written (alpha: ")
    assert "'ADOBE_API_KEY' has a value" in entry.last_error
    token = (out / "token").read_text()
    assert token not in entry.last_error


async def test_once_fails_when_an_output_was_left_out(tmp_path: Path, fake: FakeIms) -> None:
    fake.state.add_client('"client-q', secrets=[SECRET], scopes=SCOPES, org_id=ORG)
    s = make_settings(tmp_path)
    write_cred(s.credentials_dir, "alpha", fake, client_id='\\"client-q')
    assert await run_once(s, load_registry(), give_up_after=10) == 1
    assert (s.output_dir / "alpha" / "token").exists()  # what could be written was


# -- a hostile file system: umask 000, planted directories -------------------------------------


async def test_umask_000_creates_no_world_writable_directory(
    tmp_path: Path, fake: FakeIms, daemon: Any
) -> None:
    """The output, state and socket paths' missing parents used to be made 0777 under
    ``umask 000`` (Path.mkdir(parents=True)): any local user could swap a token directory."""
    old = os.umask(0)
    try:
        s = make_settings(tmp_path).model_copy(
            update={
                "output_dir": tmp_path / "run" / "out" / "tokens",
                "state_dir": tmp_path / "lib" / "deep" / "state",
                "socket": tmp_path / "sock" / "deep" / "imsd.sock",
            }
        )
        write_cred(s.credentials_dir, "alpha", fake)
        d = await daemon(s, env={})
        await wait_for(lambda: (s.output_dir / "alpha" / "token").exists())
        assert d.supervisor is not None
        await wait_for(lambda: (s.state_dir / "state.db").exists())
    finally:
        os.umask(old)
    modes = {
        p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777
        for p in (
            s.output_dir.parent.parent,
            s.output_dir.parent,
            s.output_dir,
            s.state_dir.parent,
            s.state_dir,
            s.socket.parent.parent,
            s.socket.parent,
        )
    }
    assert modes == {
        "run": 0o755,
        "run/out": 0o755,
        "run/out/tokens": 0o755,
        "lib/deep": 0o700,
        "lib/deep/state": 0o700,
        "sock/deep": 0o750,
        "sock": 0o750,
    }


async def test_a_planted_output_dir_of_another_user_fails_the_credential(
    tmp_path: Path, fake: FakeIms, daemon: Any
) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root")
    s = make_settings(tmp_path)
    planted = s.output_dir / "alpha"
    planted.mkdir(mode=0o755)
    os.chown(planted, 65534, 65534)
    write_cred(s.credentials_dir, "alpha", fake)
    d = await daemon(s, env={})
    entry = entry_of(d, "alpha")
    await wait_for(lambda: entry.last_error is not None)
    assert "alpha: owned by uid 65534, not by imsd or root; refusing" in entry.last_error
    assert entry.last_error.startswith("writing outputs: ")
    assert list(planted.iterdir()) == []
    st = planted.stat()
    assert (st.st_mode & 0o777, st.st_uid) == (0o755, 65534)


# -- clock jumps and suspend ---------------------------------------------------------------------


async def test_clock_jumps_and_suspend(tmp_path: Path, fake: FakeIms, daemon: Any) -> None:
    offset = [0.0]

    def clock() -> float:
        return time.time() + offset[0]

    s = make_settings(tmp_path, recheck_interval=0.2)
    write_cred(s.credentials_dir, "alpha", fake)
    d = await daemon(s, env={}, clock=clock)
    entry = entry_of(d, "alpha")
    token = s.output_dir / "alpha" / "token"
    first = token.read_text()
    # Back by an hour: nothing is due, no refresh storm.
    offset[0] = -3600.0
    await anyio.sleep(1.0)
    assert fake.state.request_count() == 1
    assert token.read_text() == first
    # A suspend across the refresh point (the wall clock moves, monotonic timers did not):
    # the refresh comes within the re-check interval of waking up.
    due = entry.due
    offset[0] = due - time.time() + 1.0
    woke = time.monotonic()
    await wait_for(lambda: token.read_text() != first)
    assert time.monotonic() - woke < 2.0
    assert fake.state.request_count() == 2
    assert entry.state(clock()) is CredentialState.VALID


# -- socket load ---------------------------------------------------------------------------------


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


LOAD_CLIENT = """
import json, sys, anyio

async def main(path, clients, seconds, pace):
    request = b"GET /v1/credentials/alpha/token HTTP/1.1\\r\\nHost: imsd\\r\\n\\r\\n"
    counts, errors = [0] * clients, []

    async def client(i):
        stage = "connect"
        try:
            async with await anyio.connect_unix(path) as s:
                stage = "request"
                buf = b""
                while anyio.current_time() < end:
                    with anyio.fail_after(30):
                        await s.send(request)
                        while b"\\r\\n\\r\\n" not in buf:
                            buf += await s.receive()
                        head, _, buf = buf.partition(b"\\r\\n\\r\\n")
                        length = int(head.lower().split(b"content-length: ")[1].split(b"\\r\\n")[0])
                        while len(buf) < length:
                            buf += await s.receive()
                    buf = buf[length:]
                    if not head.startswith(b"HTTP/1.1 200"):
                        errors.append(head.split(b"\\r\\n")[0].decode())
                    counts[i] += 1
                    await anyio.sleep(pace)
        except Exception as e:
            errors.append(f"{stage}: {type(e).__name__}: {e}")

    end = anyio.current_time() + seconds
    async with anyio.create_task_group() as tg:
        for i in range(clients):
            tg.start_soon(client, i)
    print(json.dumps({"counts": counts, "errors": errors}))

anyio.run(main, sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]))
"""


def load_run(tmp_path: Path, fake: FakeIms, clients: int, seconds: float) -> None:
    """*clients* keep-alive connections (an async client in its own process, so the load
    generator is not starved by this process's threads) each asking for the token ten times
    a second while the token is refreshed every ~2 s."""
    fake.state.token_lifetime = 3.0
    write_cred(tmp_path / "creds", "alpha", fake)
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMSD_")}
    env.update(IMSD_MIN_MARGIN="0.5", IMSD_RECHECK_INTERVAL="0.5")
    proc = _daemon_proc(tmp_path, env)
    sock = tmp_path / "imsd.sock"
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "tokens" / "alpha" / "token").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        load = subprocess.Popen(
            [sys.executable, "-c", LOAD_CLIENT, str(sock), str(clients), str(seconds), "0.1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        warm = min(5.0, seconds / 4)
        time.sleep(warm)
        rss_warm = _rss_kib(proc.pid)
        refreshes_before = fake.state.request_count()
        out, err = load.communicate(timeout=seconds + 120)
        rss_end = _rss_kib(proc.pid)
        assert load.returncode == 0, err.decode()[-2000:]
        result = json.loads(out)
        print(
            f"load: {clients} clients, {sum(result['counts'])} requests in {seconds:g} s, "
            f"RSS {rss_warm} -> {rss_end} KiB"
        )
        errors: list[str] = result["errors"]
        assert errors == [], collections.Counter(errors).most_common(5)
        assert all(result["counts"])
        assert fake.state.request_count() > refreshes_before  # refreshes happened under load
        assert rss_end <= rss_warm * 1.05 + 2048, (rss_warm, rss_end)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_socket_load_during_refreshes(tmp_path: Path, fake: FakeIms) -> None:
    load_run(tmp_path, fake, clients=200, seconds=6.0)


@pytest.mark.long
def test_socket_load_1000_clients_60s(tmp_path: Path, fake: FakeIms) -> None:
    load_run(tmp_path, fake, clients=1000, seconds=60.0)
