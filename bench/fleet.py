"""Fleet mode (README "Fleet mode (Redis)"), real ``imsd run`` processes sharing a real
``redis-server`` on a Unix socket, against the fake IMS with short tokens:

- IMS requests per refresh period, N daemons × M credentials in fleet mode against the same
  daemons on their own (goal: M against N × M);
- the holder's publish (seen by a subscriber on the channel) → the token file on every
  follower's disk, p50/p99 (goal: p99 ≤ 100 ms). File times are the kernel's coarse clock
  (one tick, ≤ 4 ms, early);
- failover: ``kill -9`` of the holder just before the token is due → a follower holds the
  lease and a fresh token is on its disk (goal: ≤ lease TTL + 1 s).

Without ``redis-server`` it says so in one line and gives no figures.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

import anyio
import coredis

from bench.harness import (
    Daemon,
    Figure,
    daemon,
    new_root,
    percentile,
    running_fake,
    write_credential,
)

#: The lease TTL (``coordination_lease``) of the failover runs, seconds: a dead holder is
#: replaced after it. The other runs keep the default (10 s).
LEASE = 2.0
#: refresh_fraction minus half the jitter: the mean refresh period as a share of the lifetime.
PERIOD_SHARE = 0.8 - 0.05 / 2


@contextmanager
def _redis(binary: str, root: Path) -> Iterator[Path]:
    sock = root / "redis.sock"
    proc = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)  # redis-server starting: polled, under a deadline
        yield sock
    finally:
        proc.kill()
        proc.wait()


def _env(sock: Path | None, prefix: str, lease: float | None = None) -> dict[str, str]:
    env = {"IMSD_MIN_MARGIN": "1"}
    if sock is not None:
        env.update(IMSD_COORDINATION=f"unix://{sock}", IMSD_COORDINATION_PREFIX=prefix)
    if lease is not None:
        env.update(IMSD_COORDINATION_LEASE=str(lease))
    return env


def _token(d: Daemon, name: str) -> Path:
    return d.tokens / name / "token"


def _wait_all(nodes: list[Daemon], names: list[str], limit: float = 300) -> None:
    deadline = time.monotonic() + limit
    while not all(_token(d, n).exists() for d in nodes for n in names):
        if time.monotonic() > deadline:
            raise RuntimeError("the fleet did not write every token")
        time.sleep(0.1)  # the daemons are other processes: polled, under a deadline


def _nodes(
    stack: ExitStack, fake_url: str, count: int, names: list[str], env: dict[str, str]
) -> list[Daemon]:
    nodes = []
    for _ in range(count):
        root = new_root()
        for name in names:
            write_credential(root / "creds", name, fake_url)
        nodes.append(stack.enter_context(daemon(root, env)))
    _wait_all(nodes, names)
    return nodes


def _lease_pid(sock: Path, token_key: str) -> int | None:
    """The pid in the node id holding the lease beside *token_key* (``HOST/PID/RAND:FENCE``)."""
    r = subprocess.run(
        ["redis-cli", "-s", str(sock), "--raw", "GET", token_key.removesuffix(":token") + ":lease"],
        capture_output=True,
        text=True,
        check=False,
    )
    parts = r.stdout.strip().rsplit(":", 1)[0].split("/")
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


class _Listener(threading.Thread):
    """Subscribes to the fleet's channel and notes when each publish arrived."""

    def __init__(self, sock: Path, channel: str) -> None:
        super().__init__(daemon=True)
        self.sock, self.channel = sock, channel
        self.seen: list[tuple[float, str]] = []  # (wall time, token key)
        self.ready = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        anyio.run(self._main)

    async def _main(self) -> None:
        client: coredis.Redis[bytes] = coredis.Redis.from_url(
            f"unix://{self.sock}", verify_version=False
        )
        async with client, anyio.create_task_group() as tg:

            async def listen() -> None:
                pubsub = client.pubsub(channels=[self.channel], ignore_subscribe_messages=True)
                async with pubsub:
                    self.ready.set()
                    async for message in pubsub:
                        data = message["data"]
                        key = data.decode() if isinstance(data, bytes) else str(data)
                        self.seen.append((time.time(), key))

            tg.start_soon(listen)
            await anyio.to_thread.run_sync(self.stop.wait)
            tg.cancel_scope.cancel()


def _mtimes(
    nodes: list[Daemon], names: list[str], stop: threading.Event
) -> dict[tuple[int, str], set[int]]:
    """Every distinct mtime of every token file, sampled well within a refresh period."""
    seen: dict[tuple[int, str], set[int]] = {}
    while not stop.wait(0.2):
        for i, d in enumerate(nodes):
            for name in names:
                with suppress(FileNotFoundError):
                    seen.setdefault((i, name), set()).add(_token(d, name).stat().st_mtime_ns)
    return seen


def _per_period(
    fake: Any, sock: Path | None, count: int, names: list[str], lifetime: float
) -> tuple[float, list[float]]:
    """(IMS requests per refresh period, propagation latencies in seconds) of *count*
    daemons holding *names*, in fleet mode when *sock* is given."""
    period = lifetime * PERIOD_SHARE
    prefix = f"bench{os.getpid()}{'f' if sock else 'i'}{len(names)}"
    latencies: list[float] = []
    with ExitStack() as stack:
        listener = None
        if sock is not None:
            listener = _Listener(sock, f"{prefix}:tokens")
            listener.start()
            listener.ready.wait(10)
        nodes = _nodes(stack, fake.url, count, names, _env(sock, prefix))
        started = min(_token(d, n).stat().st_mtime for d in nodes for n in names)
        # A window of two periods between two refresh rounds (they cluster: the first
        # tokens were minted together), so that each credential is refreshed twice in it.
        time.sleep(max(0.0, started + period / 2 - time.time()))
        before, opened = fake.state.request_count(), time.time()
        stop = threading.Event()
        sampled: dict[tuple[int, str], set[int]] = {}
        sampler = threading.Thread(target=lambda: sampled.update(_mtimes(nodes, names, stop)))
        sampler.start()
        time.sleep(2 * period)  # the window the sampler thread watches
        requests = (fake.state.request_count() - before) / 2
        stop.set()
        sampler.join()
        if listener is not None and sock is not None:
            listener.stop.set()
            listener.join(10)
            pids = {d.proc.pid: i for i, d in enumerate(nodes)}
            # The first tokens are left out: the later nodes were not running yet.
            for published, key in (p for p in listener.seen if p[0] >= opened):
                name = key.rsplit("{", 1)[-1].split(":", 1)[0]
                holder = pids.get(_lease_pid(sock, key) or -1)
                for i in range(count):
                    if i == holder or (i, name) not in sampled:
                        continue
                    # The first write on node i at or after the publish (a tick early at most).
                    after = [m / 1e9 for m in sampled[i, name] if m / 1e9 >= published - 0.005]
                    if after and min(after) - published < period / 2:
                        latencies.append(max(0.0, min(after) - published))
    return requests, latencies


def _failover(fake: Any, sock: Path, count: int, lifetime: float, trials: int) -> list[float]:
    """Seconds from ``kill -9`` of the holder, just before its token is due, until another
    node holds the lease and has a fresh token on disk."""
    prefix = f"bench{os.getpid()}k"
    name = "c000"
    out: list[float] = []
    with ExitStack() as stack:
        nodes = _nodes(stack, fake.url, count, [name], _env(sock, prefix, LEASE))
        key = f"{prefix}:{{{name}:"  # the lease key's name holds a key id: look it up
        r = subprocess.run(
            ["redis-cli", "-s", str(sock), "--raw", "KEYS", f"{prefix}:*:token"],
            capture_output=True,
            text=True,
            check=True,
        )
        key = next(k for k in r.stdout.split() if k.startswith(key))
        alive = list(nodes)
        for _ in range(trials):
            pids = {d.proc.pid: d for d in alive}
            holder = pids[_lease_pid(sock, key) or -1]
            issued = _token(holder, name).stat().st_mtime
            old = _token(holder, name).read_text()
            # Before the earliest due time (0.8 - 0.05 jitter of the lifetime): the followers
            # find the lease still held, wait, and take it over once it lapses.
            time.sleep(max(0.0, issued + 0.74 * lifetime - time.time()))
            holder.proc.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            holder.proc.wait()
            alive.remove(holder)
            deadline = killed + 10 * lifetime
            while time.monotonic() < deadline:
                new = pids.get(_lease_pid(sock, key) or -1)
                if new is not None and new is not holder and _token(new, name).read_text() != old:
                    out.append(time.monotonic() - killed)
                    break
                time.sleep(0.01)  # other processes' files: polled, the bench's resolution
            else:
                out.append(float("inf"))
    return out


def _latency_rows(label: str, latencies: list[float], goal: str) -> list[Figure]:
    slow = sum(1 for v in latencies if v > 0.1)
    return [
        Figure("fleet", f"publish → follower's file, {label}, p50",
               percentile(latencies, 50) * 1000, "ms",
               goal=f"{len(latencies)} writes, {slow} over 100 ms"),
        Figure("fleet", f"publish → follower's file, {label}, p99",
               percentile(latencies, 99) * 1000, "ms", goal=goal),
    ]  # fmt: skip


def run(quick: bool) -> list[Figure]:
    binary = shutil.which("redis-server")
    if binary is None or shutil.which("redis-cli") is None:
        print("fleet: no redis-server (apt-get install redis-server): skipped", file=sys.stderr)
        return []
    count, creds, few = (3, 10, 0) if quick else (10, 100, 10)
    lifetime = 8.0 if quick else 20.0
    names = [f"c{i:03d}" for i in range(creds)]
    size = f"{count} daemons × {creds} credentials"
    with running_fake(lifetime) as fake, _redis(binary, new_root()) as sock:
        fleet, burst = _per_period(fake, sock, count, names, lifetime)
        alone, _ = _per_period(fake, None, count, names, lifetime)
        light = _per_period(fake, sock, count, names[:few], lifetime)[1] if few else []
        failovers = _failover(fake, sock, 3 if quick else 5, lifetime, 1 if quick else 3)
    figures = [
        Figure("fleet", f"IMS requests per period, {size}", fleet, "req", alone,
               "independent daemons", f"{creds} vs {count * creds}"),
    ]  # fmt: skip
    if light:
        figures += _latency_rows(f"{count} × {few}", light, "≤ 100 ms")
    figures += _latency_rows(f"{count} × {creds}", burst, "" if light else "≤ 100 ms")
    figures.append(
        Figure("fleet", f"failover after kill -9 (lease {LEASE:g} s), worst of {len(failovers)}",
               max(failovers), "s", goal=f"≤ {LEASE + 1:g} s")
    )  # fmt: skip
    return figures
