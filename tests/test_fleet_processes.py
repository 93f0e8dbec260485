"""Fleet mode with real processes (README "Fleet mode (Redis)"): several ``imsd run`` daemons
against the fake IMS (short token lifetimes) and one real ``redis-server``; kill -9, SIGSTOP,
Redis lost and restarted empty, tampering, and a rotating refresh-token chain.

Every daemon and the redis-server are killed at teardown, whatever the test did to them."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from imsd.credentials import parse_credentials
from imsd.fakeims.server import FakeIms
from imsd.fleet import derive, keys_for, seal
from imsd.model import Grant, Secret

from tests.redis_support import RedisServer, redis_client, redis_server
from tests.support import ORG, SCOPES, SECRET, SECRET2, read, write_cred

pytestmark = pytest.mark.anyio


class Fleetd:
    """One ``imsd run`` process in fleet mode on its own directories, JSON log in a file."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = home
        self.log_path = home / "log.json"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "imsd",
                    "run",
                    "--credentials-dir",
                    str(home / "creds"),
                    "--output-dir",
                    str(home / "tokens"),
                    "--state-dir",
                    str(home / "state"),
                    "--socket",
                    str(home / "imsd.sock"),
                    "--metrics-address",
                    "",
                    "--log-level",
                    "info",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def token(self, name: str) -> str | None:
        return read(self.home / "tokens" / name / "token")

    def events(self, event: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("event") == event:
                out.append(entry)
        return out

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)  # also ends a stopped process
        self.proc.wait()


@contextmanager
def short_ims(lifetime: float, clients: int = 1) -> Iterator[FakeIms]:
    """The fake IMS with *lifetime*-second tokens and clients ``client-0``…, plus
    ``client-a`` (``SECRET`` and ``SECRET2``) and ``web-client`` (refresh tokens)."""
    with FakeIms.in_thread(token_lifetime=lifetime) as f:
        for i in range(clients):
            f.state.add_client(f"client-{i}", secrets=[SECRET], scopes=SCOPES, org_id=ORG)
        f.state.add_client("client-a", secrets=[SECRET, SECRET2], scopes=SCOPES, org_id=ORG)
        f.state.add_client(
            "web-client", secrets=[SECRET], scopes=["openid", "offline_access"], org_id=ORG
        )
        yield f


class Fleet:
    """The daemons of one test; all killed at teardown."""

    def __init__(self, tmp: Path, redis: RedisServer, lease: float, margin: float) -> None:
        self.tmp, self.redis = tmp, redis
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("IMSD_")}
        self.env.update(
            IMSD_COORDINATION=redis.url,
            IMSD_COORDINATION_LEASE=str(lease),
            IMSD_MIN_MARGIN=str(margin),
            IMSD_LOG_FORMAT="json",
            IMSD_BACKOFF_INITIAL="0.05",
            IMSD_BACKOFF_CAP="0.5",
            IMSD_RECHECK_INTERVAL="0.2",
            IMSD_DEBOUNCE_MS="20",
            IMSD_MIN_REFRESH_INTERVAL="0",
        )
        self.nodes: list[Fleetd] = []

    def start(self, write: Callable[[Path], None]) -> Fleetd:
        home = self.tmp / f"n{len(self.nodes)}"
        (home / "creds").mkdir(parents=True)
        write(home / "creds")
        node = Fleetd(home, self.env)
        self.nodes.append(node)
        return node

    def by_pid(self, pid: int) -> Fleetd:
        return next(n for n in self.nodes if n.pid == pid)

    def kill_all(self) -> None:
        for n in self.nodes:
            n.kill()


@pytest.fixture
def fleet_of(tmp_path: Path) -> Iterator[Callable[..., Fleet]]:
    """``fleet_of(redis, lease=1.0, margin=1.0)``: a :class:`Fleet` killed at teardown."""
    made: list[Fleet] = []

    def make(redis: RedisServer, lease: float = 1.0, margin: float = 1.0) -> Fleet:
        made.append(Fleet(tmp_path, redis, lease, margin))
        return made[-1]

    try:
        yield make
    finally:
        for f in made:
            f.kill_all()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path) as server:
        yield server


def _s2s(names: list[str], fake: FakeIms, client: Callable[[int], str]) -> Callable[[Path], None]:
    def write(creds: Path) -> None:
        for i, name in enumerate(names):
            write_cred(creds, name, fake, client_id=client(i))

    return write


async def until(predicate: Callable[[], object], limit: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        await anyio.sleep(0.05)


async def _lease(redis: RedisServer, name: str) -> tuple[int, int] | None:
    """(holder pid, fence) of *name*'s lease in Redis, or None."""
    client = redis_client(redis.url)
    async with client:
        keys = list(await client.keys(f"imsd:{{{name}:*}}:lease"))
        if not keys:
            return None
        value = await client.get(keys[0])
    if value is None:
        return None
    node, fence = bytes(value).decode().rsplit(":", 1)
    return int(node.split("/")[1]), int(fence)


async def _token_fence(redis: RedisServer, name: str) -> int | None:
    """The fence in the header of *name*'s sealed token (version byte, then 8 bytes)."""
    client = redis_client(redis.url)
    async with client:
        keys = list(await client.keys(f"imsd:{{{name}:*}}:token"))
        blob = await client.get(keys[0]) if keys else None
    return None if blob is None else int.from_bytes(bytes(blob)[1:9], "big")


def _mints(fake: FakeIms, client_id: str) -> list[float]:
    return [
        e.time for e in list(fake.state.request_log) if e.client_id == client_id and e.status == 200
    ]


def _converged(nodes: list[Fleetd], name: str, fake: FakeIms) -> bool:
    tokens = {n.token(name) for n in nodes}
    if len(tokens) != 1:
        return False
    (token,) = tokens
    return token is not None and fake.state.validate_token(token) is not None


def _all_converged(nodes: list[Fleetd], names: list[str], fake: FakeIms) -> bool:
    return all(_converged(nodes, name, fake) for name in names)


class Reader(threading.Thread):
    """Reads the token files of the watched daemons in a loop: every token seen must be one
    the fake IMS minted and still valid (never expired, never partial)."""

    def __init__(self, fake: FakeIms, nodes: list[Fleetd], names: list[str]) -> None:
        super().__init__(daemon=True)
        self.fake, self.watched, self.names = fake, list(nodes), names
        self.stop = threading.Event()
        self.bad: list[str] = []
        self.reads = 0

    def unwatch(self, node: Fleetd) -> None:
        self.watched = [n for n in self.watched if n is not node]

    def run(self) -> None:
        while not self.stop.is_set():
            for node in self.watched:
                for name in self.names:
                    token = node.token(name)
                    if token is None:
                        continue
                    self.reads += 1
                    if self.fake.state.validate_token(token) is None:
                        self.bad.append(f"{node.pid}/{name}: {token[:12]}…")
            time.sleep(0.01)  # a reader thread's pace over other processes' files


# -- 1. one mint per period across 10 daemons × 20 credentials -----------------------------


@pytest.mark.long
async def test_ten_daemons_twenty_credentials_one_mint_per_period(
    tmp_path: Path, redis: RedisServer, fleet_of: Callable[..., Fleet]
) -> None:
    life = 8.0
    names = [f"c{i}" for i in range(20)]
    with short_ims(life, clients=20) as fake:
        fleet = fleet_of(redis, lease=2.0, margin=1.0)
        for _ in range(10):
            fleet.start(_s2s(names, fake, lambda i: f"client-{i}"))
        await until(lambda: _all_converged(fleet.nodes, names, fake), 60, "converged")
        start = time.time()
        # Two more periods (each token minted once, by its holder; everyone adopts it).
        await until(lambda: time.time() > start + 2 * life, 3 * life)
        await until(lambda: _all_converged(fleet.nodes, names, fake), 30, "converged again")
        assert all(n.alive() for n in fleet.nodes)
        for i in range(20):
            mints = _mints(fake, f"client-{i}")
            assert len(mints) >= 3
            gaps = [b - a for a, b in itertools.pairwise(mints)]
            # A second mint within one period would follow the first closely.
            assert min(gaps) > life / 2, (f"client-{i}", gaps)


# -- 2. kill -9 of the holder ---------------------------------------------------------------


@pytest.mark.long
async def test_kill9_of_the_holder_a_follower_takes_over_in_time(
    tmp_path: Path, redis: RedisServer, fleet_of: Callable[..., Fleet]
) -> None:
    life, margin = 12.0, 1.5
    with short_ims(life) as fake:
        fleet = fleet_of(redis, lease=1.0, margin=margin)
        for _ in range(3):
            fleet.start(_s2s(["alpha"], fake, lambda i: "client-a"))
        await until(lambda: _converged(fleet.nodes, "alpha", fake), 60, "converged")
        lease = await _lease(redis, "alpha")
        assert lease is not None
        holder = fleet.by_pid(lease[0])
        token = holder.token("alpha")
        assert token is not None
        claims = fake.state.validate_token(token)
        assert claims is not None
        expires = (int(claims["created_at"]) + int(claims["expires_in"])) / 1000
        reader = Reader(fake, fleet.nodes, ["alpha"])
        reader.start()
        try:
            reader.unwatch(holder)  # its files stay behind and expire: nobody serves them
            holder.kill()
            killed = time.time()
            rest = [n for n in fleet.nodes if n is not holder]
            before = len(_mints(fake, "client-a"))
            await until(lambda: len(_mints(fake, "client-a")) > before, life, "takeover")
            takeover = _mints(fake, "client-a")[before]
            await until(lambda: _converged(rest, "alpha", fake) and rest[0].token("alpha") != token)
            new = await _lease(redis, "alpha")
            assert new is not None
            assert new[0] in {n.pid for n in rest}
            assert new[1] > lease[1]
        finally:
            reader.stop.set()
            reader.join()
        assert takeover > killed
        assert takeover < expires - margin / 2  # before the old token's margin ran out
        assert len(_mints(fake, "client-a")) == before + 1  # one node took over, not both
        assert reader.bad == []
        assert reader.reads > 100


# -- 3. SIGSTOP past the lease, then SIGCONT ------------------------------------------------


@pytest.mark.long
async def test_a_holder_stopped_past_its_lease_is_fenced_out(
    tmp_path: Path, redis: RedisServer, fleet_of: Callable[..., Fleet]
) -> None:
    with short_ims(6.0) as fake:
        fleet = fleet_of(redis, lease=1.0, margin=1.0)
        for _ in range(2):
            fleet.start(_s2s(["alpha"], fake, lambda i: "client-a"))
        await until(lambda: _converged(fleet.nodes, "alpha", fake), 60, "converged")
        fake.state.hang(60)  # the next refresh stays in flight at the fake
        try:
            await until(lambda: fake.state.in_flight >= 1, 15, "the holder's refresh")
            lease = await _lease(redis, "alpha")
            assert lease is not None
            stalled = fleet.by_pid(lease[0])
            other = next(n for n in fleet.nodes if n is not stalled)
            stalled.proc.send_signal(signal.SIGSTOP)
            # Its lease lapses; the other node, due as well, takes it over (a newer fence).
            taken = None
            while taken is None or taken[0] != other.pid:
                await anyio.sleep(0.05)
                taken = await _lease(redis, "alpha")
            assert taken[1] > lease[1]
            await until(lambda: fake.state.in_flight >= 2, 15, "the new holder's refresh")
        finally:
            fake.state.hang(0)  # both answers go out; the stopped one waits in its socket
        old = other.token("alpha")
        await until(lambda: other.token("alpha") != old, 15, "the new holder's token")
        assert await _token_fence(redis, "alpha") == taken[1]
        stalled.proc.send_signal(signal.SIGCONT)
        await until(lambda: stalled.events("fleet.fenced_out"), 15, "the fencing refusal")
        (refusal,) = stalled.events("fleet.fenced_out")
        assert refusal["fence"] == lease[1]
        assert refusal["level"] == "error"
        assert await _token_fence(redis, "alpha") == taken[1]  # its late write was refused
        assert stalled.alive()
        await until(lambda: _converged(fleet.nodes, "alpha", fake), 30, "re-converged")


# -- 4. Redis lost for longer than a refresh window, back empty ------------------------------


@pytest.mark.long
async def test_redis_lost_then_back_empty_nodes_serve_and_reconverge(
    tmp_path: Path, redis: RedisServer, fleet_of: Callable[..., Fleet]
) -> None:
    life = 5.0
    names = ["alpha", "beta"]
    with short_ims(life, clients=2) as fake:
        fleet = fleet_of(redis, lease=1.0, margin=0.5)
        for _ in range(3):
            fleet.start(_s2s(names, fake, lambda i: f"client-{i}"))
        await until(lambda: _all_converged(fleet.nodes, names, fake), 60, "converged")
        reader = Reader(fake, fleet.nodes, names)
        reader.start()
        try:
            redis.stop()
            before = {n.pid: n.token("alpha") for n in fleet.nodes}
            # Longer than a refresh window: every node mints on its own and says so.
            await until(
                lambda: all(n.token("alpha") != before[n.pid] for n in fleet.nodes),
                3 * life,
                "local mints",
            )
            await until(lambda: all(n.events("fleet.fallback_local") for n in fleet.nodes))
            for n in fleet.nodes:
                assert {e["level"] for e in n.events("fleet.fallback_local")} == {"error"}
                assert n.events("fleet.redis_down")
            redis.start()  # empty
            # One holder per credential again, and one shared token.
            await until(lambda: _all_converged(fleet.nodes, names, fake), 4 * life, "back")
            leases = {name: await _lease(redis, name) for name in names}
            assert None not in leases.values()
            back = time.time()
            tokens = {name: fleet.nodes[0].token(name) for name in names}

            def next_period() -> bool:
                moved = all(fleet.nodes[0].token(n) != tokens[n] for n in names)
                return moved and _all_converged(fleet.nodes, names, fake)

            await until(next_period, 3 * life, "the next period: one mint, adopted by all")
            for i in range(2):
                mints = [t for t in _mints(fake, f"client-{i}") if t > back - life / 2]
                assert mints
                gaps = [b - a for a, b in itertools.pairwise(mints)]
                assert not gaps or min(gaps) > life / 2, gaps
        finally:
            reader.stop.set()
            reader.join()
        assert reader.bad == []
        assert all(n.alive() for n in fleet.nodes)


# -- 5. tampered ciphertext, a node with another secret --------------------------------------


@pytest.mark.long
async def test_tampered_ciphertext_and_a_foreign_secret_are_rejected(
    tmp_path: Path, redis: RedisServer, fleet_of: Callable[..., Fleet]
) -> None:
    with short_ims(3600.0) as fake:
        fleet = fleet_of(redis, lease=1.0, margin=1.0)
        a = fleet.start(_s2s(["alpha"], fake, lambda i: "client-a"))
        b = fleet.start(_s2s(["alpha"], fake, lambda i: "client-a"))
        await until(lambda: _converged([a, b], "alpha", fake), 60, "converged")
        token = a.token("alpha")
        client = redis_client(redis.url)
        async with client:
            (key,) = await client.keys("imsd:{alpha:*}:token")
            sealed = bytes(await client.get(key) or b"")
            blob = bytearray(sealed)
            blob[-1] ^= 1
            await client.set(key, bytes(blob))
            await client.publish("imsd:tokens", key)  # as a writer would announce it
        await until(
            lambda: a.events("fleet.token_rejected") and b.events("fleet.token_rejected"),
            15,
            "rejections",
        )
        for n in (a, b):
            event = n.events("fleet.token_rejected")[0]
            assert event["level"] == "error"
            assert n.token("alpha") == token  # nothing overwritten
        async with client:
            await client.set(key, sealed)

        def foreign(creds: Path) -> None:
            write_cred(creds, "alpha", fake, secret=SECRET2)

        c = fleet.start(foreign)  # same name, another secret: another group
        await until(lambda: c.token("alpha") is not None, 30, "the foreign node's token")
        assert c.token("alpha") != token  # it could not adopt theirs: it minted its own
        async with client:
            assert len(await client.keys("imsd:{alpha:*}:token")) == 2  # two groups
            assert await client.get(key) == sealed  # and it did not overwrite theirs
        assert (a.token("alpha"), b.token("alpha")) == (token, token)
        assert not c.events("fleet.token_rejected")
        assert all(n.alive() for n in fleet.nodes)
        log_text = "".join(n.log_path.read_text() for n in fleet.nodes)
        assert SECRET not in log_text
        assert SECRET2 not in log_text


# -- 6. a refresh-token chain shared by five daemons ----------------------------------------


def _refresh_cred(fake: FakeIms, seed: str) -> Callable[[Path], None]:
    def write(creds: Path) -> None:
        (creds / "user.rt").write_text(seed + "\n")
        (creds / "user.toml").write_text(
            f'auth = "refresh_token"\nclient_id = "web-client"\nclient_secret = "{SECRET}"\n'
            f'org_id = "{ORG}"\nrefresh_token_file = "user.rt"\nims_url = "{fake.url}"\n'
        )

    return write


@pytest.mark.long
async def test_a_refresh_token_chain_shared_by_five_daemons_never_breaks(
    tmp_path: Path, redis: RedisServer, fleet_of: Callable[..., Fleet]
) -> None:
    with short_ims(2.5) as fake:
        seed = fake.state.login("web-client", ["openid", "offline_access"])
        fleet = fleet_of(redis, lease=1.0, margin=0.3)
        for _ in range(5):
            fleet.start(_refresh_cred(fake, seed))

        def grants() -> list[int]:
            return [
                e.status for e in list(fake.state.request_log) if e.grant_type == "refresh_token"
            ]

        await until(lambda: len(grants()) >= 20, 90, "20 rotations")
        await until(lambda: _converged(fleet.nodes, "user", fake), 15, "converged")
        assert grants() == [200] * len(grants())  # never an invalid_grant: no fork
        assert fake.state.live_refresh_tokens() == 1
        assert all(n.alive() for n in fleet.nodes)


# -- 7. hostile messages on the fleet's channel ----------------------------------------------


def _forge(node: Fleetd, name: str, grant: Grant) -> tuple[str, bytes]:
    """(token key, sealed blob) of *grant* for *node*'s credential *name*: what its holder
    would write (the test holds the credential's secret, as a node does)."""
    path = node.home / "creds" / f"{name}.toml"
    (cred,) = parse_credentials(path, path.read_bytes(), env={})
    key, kid = derive(cred)
    token_key = keys_for("imsd", name, kid).token
    return token_key, seal(key, token_key, 1, grant)


async def _publish(client: Any, node: Fleetd, data: bytes) -> None:
    """PUBLISH *data* on the fleet's channel once *node*'s subscriber hears it."""
    with anyio.fail_after(15):
        while await client.publish("imsd:tokens", data) < 1:
            assert node.alive(), node.log_path.read_text()[-2000:]
            await anyio.sleep(0.05)  # the daemon's subscriber (re)connecting


async def test_garbage_on_the_channel_is_dropped_and_the_node_still_follows(
    tmp_path: Path, redis: RedisServer, fleet_of: Callable[..., Fleet]
) -> None:
    """Issue 23 #1: anyone with PUBLISH rights sent ``\\xff`` and every node exited."""
    with short_ims(3600.0) as fake:
        # A 30 s lease: the reconcile runs every 30 s, so only the message can bring the
        # forged token below in time.
        fleet = fleet_of(redis, lease=30.0, margin=1.0)
        node = fleet.start(_s2s(["alpha"], fake, lambda i: "client-a"))
        await until(lambda: _converged([node], "alpha", fake), 30, "the first token")
        client = redis_client(redis.url)
        good_name = b"imsd:{alpha:" + b"0" * 24 + b"}:token"
        garbage = [
            b"\xff",  # not UTF-8
            b"\xc3\x28imsd",
            b"x" * 65536,  # longer than any token key
            b"",
            b"imsd:{alpha:not-a-key-id}:token",
            good_name + b"\n",
            good_name.replace(b"imsd", b"other"),
            "imsd:{älpha:000000000000000000000000}:token".encode(),
        ]
        async with client:
            for data in garbage:
                await _publish(client, node, data)
            ims_client = fake.state.client("client-a")
            assert ims_client is not None
            token, life = fake.state.mint(ims_client, SCOPES)
            now = time.time()
            grant = Grant(Secret(token), "bearer", now, now + life)
            token_key, blob = _forge(node, "alpha", grant)
            await client.set(token_key, blob)
            await _publish(client, node, token_key.encode())
        # Adopted from the message, after every piece of garbage before it.
        await until(lambda: node.token("alpha") == token, 15, "the announced token adopted")
        assert node.alive()
        (line,) = node.events("fleet.message_rejected")  # once a minute, each one counted
        assert (line["level"], line["reason"], line["size"]) == ("warning", "not UTF-8", 1)
        assert node.events("token.adopted")
