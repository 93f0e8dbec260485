"""Fleet mode (README "Fleet mode (Redis)"): the pure sealing and decisions, then several
in-process daemons sharing one real ``redis-server`` against the fake IMS."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import coredis
import pytest
from imsd import fleet
from imsd.daemon import Daemon
from imsd.fakeims.server import FakeIms
from imsd.fleetredis import Fleet
from imsd.model import Credential, Grant, ImsError, ImsErrorKind, Secret
from imsd.registry import load_registry
from imsd.scheduler import Record
from imsd.store import TokenStore

from tests.redis_support import RedisServer as RedisServer  # re-exported: test_fleet_status
from tests.redis_support import redis_server
from tests.support import SECRET, SECRET2, add_standard_clients, make_settings, read, write_cred

pytestmark = pytest.mark.anyio

# -- pure: keys, sealing, decisions -----------------------------------------------------------


def _cred(secret: str = SECRET, auth: str = "oauth_server_to_server", name: str = "alpha") -> Any:
    return Credential(
        name=name,
        path=Path(f"/x/{name}.toml"),
        auth=auth,
        client_id="client-a",
        client_secret=Secret(secret),
        org_id="ORG@AdobeOrg",
        scopes=("openid",),
    )


def _grant(issued: float = 1000.0, life: float = 3600.0, rt: str | None = None) -> Grant:
    return Grant(
        Secret("eyJ.access-token-value"),
        "bearer",
        issued,
        issued + life,
        Secret(rt) if rt else None,
    )


def test_seal_round_trips_and_binds_key_name_and_fence() -> None:
    key, kid = fleet.derive(_cred())
    keys = fleet.keys_for("imsd", "alpha", kid)
    grant = _grant(rt="rotated-refresh-token")
    blob = fleet.seal(key, keys.token, 7, grant)
    assert b"access-token" not in blob
    assert b"rotated-refresh" not in blob
    opened = fleet.open_sealed(key, keys.token, blob)
    assert opened == fleet.Sealed(grant, 7)
    with pytest.raises(fleet.Tampered):  # moved to another key
        fleet.open_sealed(key, keys.token + "x", blob)
    with pytest.raises(fleet.Tampered):  # the fence in the header rewritten
        fleet.open_sealed(key, keys.token, blob[:1] + (8).to_bytes(8, "big") + blob[9:])
    flipped = bytearray(blob)
    flipped[-1] ^= 1
    with pytest.raises(fleet.Tampered):
        fleet.open_sealed(key, keys.token, bytes(flipped))
    with pytest.raises(fleet.Tampered):
        fleet.open_sealed(key, keys.token, b"short")


def test_another_secret_derives_another_key_and_group() -> None:
    key, kid = fleet.derive(_cred(SECRET))
    other_key, other_kid = fleet.derive(_cred(SECRET2))
    assert key != other_key
    assert kid != other_kid
    assert SECRET not in kid
    token_key = fleet.keys_for("imsd", "alpha", kid).token
    blob = fleet.seal(key, token_key, 1, _grant())
    with pytest.raises(fleet.Tampered):  # even at the same key name
        fleet.open_sealed(other_key, token_key, blob)


@pytest.mark.parametrize(
    ("ours", "shared", "now", "expected"),
    [
        (None, None, 0.0, False),
        (None, _grant(1000), 1500.0, True),  # nothing of ours: take it
        (None, _grant(1000, 100), 1200.0, False),  # expired
        (_grant(1000), _grant(1000), 1500.0, False),  # the same one
        (_grant(1000), _grant(2000), 2500.0, True),  # newer
        (_grant(2000), _grant(1000), 2500.0, False),  # older (a late writer's)
    ],
)
def test_adoptable(ours: Grant | None, shared: Grant | None, now: float, expected: bool) -> None:
    assert fleet.adoptable(ours, shared, now) is expected


def test_only_s2s_and_jwt_fall_back() -> None:
    assert fleet.may_fall_back(_cred(auth="oauth_server_to_server"))
    assert fleet.may_fall_back(_cred(auth="jwt"))
    assert not fleet.may_fall_back(_cred(auth="refresh_token"))


def test_deferred_waits_without_counting_a_failure() -> None:
    cred = _cred()
    rec = Record("alpha", cred.path, credential=cred, fetching=cred.identity)
    new, effects = fleet.deferred(rec, cred.identity, 50.0, 10.0)
    assert (new.due, new.fetching, new.consecutive_failures, effects) == (50.0, None, 0, ())
    changed = replace(rec, credential=_cred(SECRET2))
    new, effects = fleet.deferred(changed, cred.identity, 50.0, 10.0)
    assert new.due == 10.0
    assert len(effects) == 1


KEY_ID = "0123456789abcdef01234567"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ("imsd:{alpha:0123456789abcdef01234567}:token", "not a byte string"),
        (7, "not a byte string"),
        (None, "not a byte string"),
        (b"\xff", "not UTF-8"),
        (b"x" * 200, "longer than a token key"),
        (b"", "not a token key"),
        (b"imsd:{alpha:nothex}:token", "not a token key"),
        (f"imsd:{{alpha:{KEY_ID}}}:token\n".encode(), "not a token key"),
        (f"other:{{alpha:{KEY_ID}}}:token".encode(), "not a token key"),
        (f"imsd:{{alpha:{KEY_ID}}}:lease".encode(), "not a token key"),
        (f"imsd:{{{'a' * 65}:{KEY_ID}}}:token".encode(), "longer than a token key"),
        (f"imsd:{{älpha:{KEY_ID}}}:token".encode(), "not a token key"),
    ],
)
def test_a_channel_message_must_name_a_token_key(data: object, reason: str) -> None:
    with pytest.raises(fleet.Rejected) as e:
        fleet.announced("imsd", data)
    assert str(e.value) == reason


def test_a_token_key_is_announced() -> None:
    for name in ("alpha", "a" * 64, "x.y_z-1"):
        key = fleet.keys_for("imsd", name, KEY_ID).token
        assert fleet.announced("imsd", key.encode()) == key
    key = fleet.keys_for("fleet.a:b-c", "a" * 64, KEY_ID).token  # the longest under it
    assert len(key) == fleet.announcement_limit("fleet.a:b-c")
    assert fleet.announced("fleet.a:b-c", key.encode()) == key


@pytest.mark.parametrize(
    "reply",
    [
        7,
        b"OK",
        None,
        [1],
        [1, 2, 3],
        [True, b"n:1"],
        [-1, b"n:1"],
        [2**63, b"n:1"],
        [1, 2],
        [1, [b"x"]],
        [1, b"x" * 513],
        {1: b"x"},
    ],
)
def test_a_wrong_shaped_acquire_reply_is_malformed(reply: object) -> None:
    with pytest.raises(fleet.Malformed) as e:
        fleet.acquire_reply(reply)
    assert str(e.value).startswith("ACQUIRE answered a ")  # the shape, never the contents
    assert fleet.acquire_reply([5, b"node:5"]) == (5, "node:5")


@pytest.mark.parametrize("reply", [2, -1, True, b"1", None, [1]])
def test_a_script_flag_is_0_or_1(reply: object) -> None:
    with pytest.raises(fleet.Malformed):
        fleet.flag_reply("RENEW", reply)
    assert (fleet.flag_reply("RENEW", 0), fleet.flag_reply("RENEW", 1)) == (False, True)


def test_a_value_reply_is_bounded() -> None:
    assert fleet.value_reply("GET", None, 4) is None
    assert fleet.value_reply("GET", b"abcd", 4) == b"abcd"
    for bad in (b"abcde", 10**12, [b"a"], "str"):
        with pytest.raises(fleet.Malformed):
            fleet.value_reply("GET", bad, 4)


def test_no_redis_client_is_imported_without_coordination() -> None:
    code = (
        "import sys, imsd.daemon, imsd.cli, imsd.supervisor\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('coredis', 'redis')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- a real redis-server ----------------------------------------------------------------------


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path) as server:
        yield server


@pytest.fixture
def short() -> Iterator[FakeIms]:
    """The fake IMS with 3-second tokens: a refresh period every ~2.4 s."""
    with FakeIms.in_thread(token_lifetime=3.0) as f:
        add_standard_clients(f)
        yield f


class Node:
    def __init__(self, d: Daemon, scope: anyio.CancelScope) -> None:
        self.d, self.scope = d, scope

    @property
    def token(self) -> str | None:
        return read(self.d.settings.output_dir / "alpha" / "token")

    @property
    def fleet(self) -> Fleet:
        assert isinstance(self.d.fleet, Fleet)
        return self.d.fleet


@pytest.fixture
async def nodes(tmp_path: Path, redis: RedisServer, short: FakeIms) -> AsyncIterator[Any]:
    """``await start(i, secret=...)`` starts daemon *i* in fleet mode on its own dirs."""
    async with anyio.create_task_group() as tg:

        async def start(i: int, secret: str = SECRET) -> Node:
            home = tmp_path / f"n{i}"
            home.mkdir()
            write_cred(home / "creds", "alpha", short, secret=secret)
            settings = make_settings(
                home, coordination=redis.url, coordination_lease=1.0, min_margin=0.3
            )
            d = Daemon(settings, load_registry(), env={})
            scope = anyio.CancelScope()

            async def run(*, task_status: Any) -> None:
                with scope:
                    await d.run(handle_signals=False, task_status=task_status)

            await tg.start(run)
            return Node(d, scope)

        yield start
        tg.cancel_scope.cancel()


async def _until(predicate: Any, limit: float = 15.0) -> None:
    with anyio.fail_after(limit):
        while not predicate():
            await anyio.sleep(0.02)


async def _redis_dump(url: str) -> list[bytes]:
    client: coredis.Redis[bytes] = coredis.Redis.from_url(url, verify_version=False)
    async with client:
        keys = await client.keys("*")
        out = [bytes(k) for k in keys]
        for k in keys:
            if await client.type(k) == b"string":
                v = await client.get(k)
                out.append(bytes(v or b""))
    return out


async def test_one_mint_per_period_and_followers_adopt(
    nodes: Any, short: FakeIms, redis: RedisServer
) -> None:
    a = await nodes(0)
    b = await nodes(1)
    c = await nodes(2)
    group = [a, b, c]
    await _until(lambda: len({n.token for n in group}) == 1 and a.token)
    assert short.state.request_count("client-a") == 1
    first = a.token
    await _until(lambda: a.token != first and len({n.token for n in group}) == 1)
    assert short.state.request_count("client-a") == 2  # one mint for three nodes
    assert [n.fleet.role("alpha") for n in group].count("holder") == 1
    # What Redis sees: names, counters and ciphertext, never a token or the secret.
    dump = b"\n".join(await _redis_dump(redis.url))
    assert a.token is not None
    assert a.token.encode() not in dump
    assert SECRET.encode() not in dump
    assert b"alpha" in dump  # the key names do say which credential


async def test_a_dead_holder_is_replaced_and_a_stale_one_is_fenced_out(
    nodes: Any, short: FakeIms, redis: RedisServer
) -> None:
    a = await nodes(0)
    b = await nodes(1)
    await _until(lambda: a.token and a.token == b.token)
    assert a.fleet.role("alpha") == "holder"
    key, keys = a.fleet._keys(a.d.supervisor.store.get("alpha").credential)
    old_fence = int(a.fleet._held["alpha"][1].rsplit(":", 1)[1])
    a.scope.cancel()  # gone without releasing its lease (as after kill -9)
    before = short.state.request_count("client-a")
    token = b.token
    await _until(lambda: b.token != token)
    await _until(lambda: b.fleet.role("alpha") == "holder")
    assert short.state.request_count("client-a") == before + 1
    # The old holder, resumed, writes with its old fence: refused, nothing overwritten.
    late = Fleet(redis.url, lease=1.0)
    async with anyio.create_task_group() as tg:
        await tg.start(late.run, b.d.supervisor)
        stale = _grant(time.time(), 3600.0)
        assert await late.publish(key, keys, old_fence, stale) is False
        tg.cancel_scope.cancel()
    dump = await _redis_dump(redis.url)
    assert all(b"access-token-value" not in v for v in dump)


async def test_a_node_with_another_secret_cannot_read_or_overwrite(
    nodes: Any, short: FakeIms, redis: RedisServer
) -> None:
    a = await nodes(0)
    b = await nodes(1, secret=SECRET2)  # same name, another secret (the fake takes both)
    await _until(lambda: a.token and b.token)
    assert a.token != b.token  # b could not adopt a's token: it minted its own
    ka = a.fleet._keys(a.d.supervisor.store.get("alpha").credential)
    kb = b.fleet._keys(b.d.supervisor.store.get("alpha").credential)
    assert ka[1].token != kb[1].token
    # A blob sealed under b's key planted at a's key name is rejected by a, not adopted.
    client: coredis.Redis[bytes] = coredis.Redis.from_url(redis.url, verify_version=False)
    forged = fleet.seal(kb[0], ka[1].token, 1, _grant(time.time(), 3600.0))
    async with client:
        await client.set(ka[1].token, forged)
    token = a.token
    await a.fleet.reconcile()
    assert a.token == token


async def test_redis_down_falls_back_for_s2s_then_recovers(
    nodes: Any, short: FakeIms, redis: RedisServer
) -> None:
    a = await nodes(0)
    b = await nodes(1)
    await _until(lambda: a.token and a.token == b.token)
    redis.stop()
    before = short.state.request_count("client-a")
    ta, tb = a.token, b.token
    # Each node mints on its own once its token is due: both keep fresh tokens.
    await _until(lambda: a.token != ta and b.token != tb)
    assert short.state.request_count("client-a") >= before + 2
    redis.start()  # back, empty: the fleet re-converges to one holder without a restart
    await _until(lambda: [a.fleet.role("alpha"), b.fleet.role("alpha")].count("holder") == 1)
    await _until(lambda: a.token == b.token)


async def test_channel_garbage_is_counted_and_dropped(nodes: Any, redis: RedisServer) -> None:
    a = await nodes(0)
    await _until(lambda: a.token)
    client: coredis.Redis[bytes] = coredis.Redis.from_url(redis.url, verify_version=False)

    def rejected() -> float | None:
        labels = {"event": "message_rejected"}
        value: float | None = a.d.metrics.registry.get_sample_value(
            "imsd_fleet_events_total", labels
        )
        return value

    assert rejected() == 0.0
    async with client:
        for data in (b"\xff", b"imsd:{alpha:zz}:token", b"y" * 4096):
            while await client.publish("imsd:tokens", data) < 1:
                await anyio.sleep(0.02)  # until the node's subscriber hears it
    await _until(lambda: rejected() == 3.0)
    assert a.fleet._rejected_since == 2  # one log line; the next two only counted


async def test_a_refresh_token_credential_waits_for_redis(tmp_path: Path) -> None:
    dead = Fleet(f"unix://{tmp_path}/nothing.sock", lease=1.0)
    cred = _cred(auth="refresh_token")
    rec = Record("alpha", cred.path, credential=cred)
    calls: list[int] = []

    async def fetch() -> Grant:
        calls.append(1)
        return _grant()

    async with anyio.create_task_group() as tg:
        await tg.start(dead.run, SimpleNamespace(store=TokenStore()))
        with pytest.raises(ImsError, match="coordination_unavailable"):
            await dead.exchange(rec, fetch)
        s2s = replace(rec, credential=_cred())
        assert await dead.exchange(s2s, fetch) == _grant()  # S2S: minted locally
        tg.cancel_scope.cancel()
    assert calls == [1]


async def _script(url: str, script: str, keys: list[str], args: list[str | bytes]) -> Any:
    client: coredis.Redis[bytes] = coredis.Redis.from_url(url, verify_version=False)
    async with client:
        return await client.eval(script, keys, args)


async def test_a_redis_restarted_empty_never_repeats_a_fence(redis: RedisServer) -> None:
    keys = fleet.keys_for("imsd", "alpha", "kid")
    lease = [keys.lease, keys.fence]
    fence, holder = await _script(redis.url, fleet.ACQUIRE, lease, ["a", "60000"])
    assert bytes(holder).decode() == f"a:{fence}"
    blob = fleet.seal(b"k" * 32, keys.token, int(fence), _grant())
    args: list[str | bytes] = [str(fence), blob, "60000", keys.channel]
    assert await _script(redis.url, fleet.PUBLISH, [keys.fence, keys.token], args) == 1
    redis.stop()  # its data gone with it (--save "")
    redis.start()
    new, _ = await _script(redis.url, fleet.ACQUIRE, lease, ["b", "60000"])
    assert int(new) > int(fence)  # an INCR from zero would have handed out 1 again
    # The holder from before the restart, resuming, is fenced out of the new Redis.
    assert await _script(redis.url, fleet.PUBLISH, [keys.fence, keys.token], args) == 0
    again, _ = await _script(redis.url, fleet.ACQUIRE, lease, ["b", "60000"])
    assert again == new  # renewing our own lease keeps the fence


async def test_a_chain_link_whose_publish_failed_is_published_before_a_takeover(
    redis: RedisServer,
) -> None:
    """A refresh_token holder rotates the chain, then cannot publish (Redis gone): the
    followers' link is spent. When Redis is back (empty) the holder publishes its link before
    anyone can take over with the spent one; a follower then adopts it and never calls IMS."""
    cred = _cred(auth="refresh_token")
    old = _grant(time.time() - 100, 3600.0, rt="rt-1")
    rec = Record("alpha", cred.path, credential=cred, grant=old, grant_identity=cred.identity)
    holder, follower = Fleet(redis.url, lease=1.0), Fleet(redis.url, lease=1.0)
    newer = _grant(time.time(), 3600.0, rt="rt-2")
    follower_calls: list[int] = []

    async def rotate() -> Grant:
        redis.stop()  # gone between the IMS answer and the publish
        return newer

    async def spent() -> Grant:
        follower_calls.append(1)
        raise ImsError(ImsErrorKind.PERMANENT, "invalid_grant", "spent link")

    store = SimpleNamespace(store=TokenStore())
    async with anyio.create_task_group() as tg:
        await tg.start(holder.run, store)
        await tg.start(follower.run, store)
        assert await holder.exchange(rec, rotate) == newer
        redis.start()  # empty: no lease, no token
        await _until(lambda: not holder._unpublished)  # its renewer published the link
        got = await follower.exchange(rec, spent)  # due too: adopts, never spends rt-1
        assert got.refresh_token == Secret("rt-2")
        assert follower_calls == []
        # A holder whose fetch fails gives its lease up: it must not block the chain.
        ahead = replace(rec, grant=_grant(time.time() + 1, 3600.0, rt="rt-2"))
        assert holder.role("alpha") == "holder"
        with pytest.raises(ImsError):
            await holder.exchange(ahead, spent)
        assert holder.role("alpha") == "follower"
        assert [k for k in await _redis_dump(redis.url) if k.endswith(b":lease")] == []
        tg.cancel_scope.cancel()


# -- bounded reads: a value planted with SET costs at most MAX_REPLY ------------------------

_READ_BIG = """
import sys, anyio
from imsd.fleet import Malformed
from imsd.fleetredis import Fleet

def hwm():
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmHWM:"))  # KiB


async def main():
    f = Fleet(sys.argv[1])
    async with f._client:
        f._pool_ready.set()
        before = hwm()
        try:
            await f._call(lambda: f._client.get("big"))
            verdict = "read"
        except Malformed:
            verdict = "refused"
        after = hwm()
        small = await f._call(lambda: f._client.get("small"))
        print("RESULT", verdict, (after - before) // 1024, small.decode())

anyio.run(main)
"""


async def test_an_oversized_value_is_refused_at_the_protocol_reader(redis: RedisServer) -> None:
    """Issue 23 #5: 300 MiB in the token key grew every node by ~1.2 GiB (read whole, then
    copied). Now the reply ends its connection at MAX_REPLY; the next command still works."""
    client: coredis.Redis[bytes] = coredis.Redis.from_url(redis.url, verify_version=False)
    async with client:
        await client.set("big", b"x" * (64 << 20))
        await client.set("small", b"ok")
    with anyio.fail_after(60):
        out = await anyio.run_process([sys.executable, "-c", _READ_BIG, redis.url], check=False)
    lines = [line for line in out.stdout.decode().splitlines() if line.startswith("RESULT ")]
    assert lines, (out.stdout + out.stderr)[-2000:].decode(errors="replace")
    _, verdict, grown_mib, small = lines[-1].split()
    assert (verdict, small) == ("refused", "ok"), out.stderr[-2000:].decode(errors="replace")
    assert int(grown_mib) < 32, f"peak RSS grew by {grown_mib} MiB reading a 64 MiB value"
