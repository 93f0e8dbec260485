"""Fleet mode: the Redis driver (``coordination = "redis://…"``).

The decisions and the scripts are in :mod:`imsd.fleet`; this module runs them against Redis
with ``coredis`` (anyio-native: it runs on the asyncio and the trio backends, where
``redis.asyncio`` would tie the daemon to asyncio). It is imported only when coordination is
configured, so a daemon without it never loads a Redis client.

:meth:`Fleet.exchange` wraps the supervisor's IMS call: adopt a newer shared token, or take
the lease, fetch and publish (fenced) before the files are written, or wait for the holder.
:meth:`Fleet.run` owns the connection pool, the subscriber that adopts what other nodes
publish, the reconciler (a missed message, a restart) and the lease renewer.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import anyio
import anyio.abc
import coredis
import structlog
from coredis.exceptions import InvalidResponse, RedisError
from coredis.parser import NotEnoughData, Parser

from imsd import fleet
from imsd.fleet import Deferred, FleetKeys, Malformed, Sealed, Tampered, Unavailable
from imsd.model import Credential, Grant, ImsError, ImsErrorKind
from imsd.scheduler import Record

if TYPE_CHECKING:
    from imsd.supervisor import Supervisor

__all__ = ["Fleet", "FleetObserver"]

log = structlog.get_logger("imsd.fleet")

#: One Redis round trip may take this long before Redis counts as unreachable.
OP_TIMEOUT: Final = 2.0
#: The longest reply read from Redis, on the wire: a sealed token from the largest IMS answer
#: (exchange.MAX_BODY, 1 MiB) with room for JSON's escapes. A longer one (a value planted
#: with SET, a PUBLISH) ends its connection once this much is buffered, instead of being read
#: whole (300 MiB in the token key grew every node by ~1.2 GiB).
MAX_REPLY: Final = 4 << 20
#: Seconds between two log lines about refused channel messages (each one is counted): a
#: publisher in a loop cannot fill the disk.
REJECTED_LOG_EVERY: Final = 60.0


class Oversized(InvalidResponse):
    """A reply longer than :data:`MAX_REPLY`: its connection is dropped."""


class BoundedParser:
    """coredis's RESP parser (compiled: it cannot be subclassed) that refuses a reply once
    more than *limit* bytes of it are buffered, so what a server sends costs at most *limit*
    plus one read. Counted on the wire from the end of the last whole reply."""

    def __init__(self, limit: int = MAX_REPLY) -> None:
        self._inner = Parser()
        self.limit = limit
        self._pending = 0  # bytes fed since the last whole reply

    def feed(self, data: bytes) -> None:
        self._pending += len(data)
        if self._pending > self.limit:
            raise Oversized(f"a reply longer than {self.limit} bytes")
        self._inner.feed(data)

    def parse(self, decode: bool = False, encoding: str | None = None) -> Any:
        out = self._inner.parse(decode, encoding)
        if not isinstance(out, NotEnoughData):
            self._pending = self._inner.bytes_written - self._inner.bytes_read
        return out

    def on_disconnect(self) -> None:
        self._inner.on_disconnect()
        self._pending = 0

    def can_read(self) -> bool:
        return self._inner.can_read()


def _bounded(cls: type[Any]) -> type[Any]:
    """*cls* (coredis's TCP or Unix connection) reading through a :class:`BoundedParser`."""

    class Bounded(cls):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._parser = BoundedParser()

    return Bounded


class FleetObserver(Protocol):
    """Where fleet events are counted (:class:`imsd.metrics.Metrics`)."""

    def fleet_event(self, event: str) -> None: ...

    def fleet_up(self, up: bool) -> None: ...

    def fleet_holder(self, credential: str, holder: bool) -> None: ...


class Fleet:
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "imsd",
        password: str | None = None,
        lease: float = 10.0,
        reconcile_interval: float | None = None,
        clock: Callable[[], float] = time.time,
        observer: FleetObserver | None = None,
        node: str | None = None,
    ) -> None:
        self.prefix = prefix
        self.lease = lease
        self.reconcile_interval = reconcile_interval or lease
        self.node = node or f"{socket.gethostname()}/{os.getpid()}/{os.urandom(4).hex()}"
        self._clock = clock
        self._observer = observer
        self._client: coredis.Redis[bytes] = coredis.Redis.from_url(
            url,
            password=password,
            connect_timeout=OP_TIMEOUT,
            stream_timeout=OP_TIMEOUT,
            verify_version=False,
        )
        pool = self._client.connection_pool
        pool.connection_class = _bounded(pool.connection_class)
        self._derived: dict[tuple[str, str], tuple[bytes, FleetKeys]] = {}
        self._names: dict[str, str] = {}  # token key -> credential name
        self._held: dict[str, tuple[FleetKeys, str]] = {}  # name -> (keys, "<node>:<fence>")
        # A rotating chain's link minted here but not in Redis (its publish failed): the
        # followers' link is spent, so it is published as soon as Redis answers again.
        self._unpublished: dict[str, tuple[bytes, FleetKeys, Grant]] = {}
        self._supervisor: Supervisor | None = None
        self._up: bool | None = None
        self._pool_ready = anyio.Event()
        # Since the last reply of the wrong shape, no reply of the right one: the subscriber's
        # connection alone does not make such a server Redis again.
        self._garbled = False
        self._rejected_logged = -math.inf  # monotonic time of the last such line
        self._rejected_since = 0  # refused since then, not logged

    # -- bookkeeping --------------------------------------------------------------------------

    def _keys(self, cred: Credential) -> tuple[bytes, FleetKeys]:
        got = self._derived.get((cred.name, cred.identity))
        if got is None:
            key, kid = fleet.derive(cred)
            got = (key, fleet.keys_for(self.prefix, cred.name, kid))
            self._derived[(cred.name, cred.identity)] = got
            self._names[got[1].token] = cred.name
        return got

    def _event(self, event: str) -> None:
        if self._observer is not None:
            self._observer.fleet_event(event)

    def _reachable(self, up: bool, *, logged: bool = False) -> None:
        if up != self._up:
            if up:
                log.info("fleet.redis_up", node=self.node)
            elif self._up is not None and not logged:
                log.error("fleet.redis_down", node=self.node)
            self._up = up
            if self._observer is not None:
                self._observer.fleet_up(up)
                # A lease nobody can renew or see is not held in any useful sense: the
                # gauge says so until Redis answers again (the lease may still be ours then).
                for name in self._held:
                    self._observer.fleet_holder(name, up)

    def _holding(self, name: str, held: tuple[FleetKeys, str] | None) -> None:
        was = name in self._held
        if held is None:
            self._held.pop(name, None)
        else:
            self._held[name] = held
        if self._observer is not None and was != (held is not None):
            self._observer.fleet_holder(name, held is not None)

    def role(self, name: str) -> str:
        if self._up is False:
            return "local"
        return "holder" if name in self._held else "follower"

    async def roles(self, creds: Iterable[Credential]) -> dict[str, tuple[str, str | None]]:
        """For ``imsd status``: per credential, this node's role (``holder``, ``follower``,
        or ``local`` while Redis is unreachable) and the node id holding the lease, as Redis
        says (None when nobody holds it). One short read per credential, none while Redis is
        known to be down: a status query never waits on an unreachable Redis."""
        out: dict[str, tuple[str, str | None]] = {}
        for cred in creds:
            name = cred.name
            holder: str | None = None
            if self._up is not False:
                lease = self._keys(cred)[1].lease
                with contextlib.suppress(Unavailable):
                    value = await self._call(
                        partial(self._client.get, lease),
                        partial(fleet.value_reply, "GET", limit=fleet.MAX_LEASE_VALUE),
                        vouches=False,
                    )
                    if value is not None:
                        holder = value.decode(errors="replace").rsplit(":", 1)[0]
            if self._up is False:  # on its own until Redis answers again
                out[name] = ("local", None)
            elif name in self._held:
                out[name] = ("holder", self.node)
            else:
                out[name] = ("holder" if holder == self.node else "follower", holder)
        return out

    async def _call(
        self,
        op: Callable[[], Awaitable[Any]],
        check: Callable[[Any], object] | None = None,
        *,
        vouches: bool = True,
    ) -> Any:
        """*op*'s reply, passed through *check* (one of :mod:`imsd.fleet`'s ``*_reply``).
        Whatever goes wrong — no answer, an error, a reply the client library cannot parse
        or one of another shape — is Redis unavailable (:class:`Unavailable`): nothing the
        server on the coordination address says can end the daemon. After a reply of the
        wrong shape only one that *vouches* (a script's, which a server answering anything
        with the same string does not give) makes Redis reachable again."""
        await self._pool_ready.wait()
        try:
            with anyio.fail_after(OP_TIMEOUT):
                out = await op()
            if check is not None:
                out = check(out)
        except Malformed as e:
            self._malformed(str(e))
            raise
        except Oversized as e:
            self._malformed(str(e))
            raise Malformed("Oversized") from None
        except InvalidResponse:  # not RESP
            self._malformed("the reply is not RESP")
            raise Malformed("InvalidResponse") from None
        except (RedisError, OSError, TimeoutError) as e:
            self._reachable(False)
            raise Unavailable(type(e).__name__) from None
        except Exception as e:  # the client library choking on a hostile reply
            self._malformed(f"the reply could not be read ({type(e).__name__})")
            raise Malformed(type(e).__name__) from None
        if vouches:
            self._garbled = False
        if not self._garbled:
            self._reachable(True)
        return out

    def _malformed(self, what: str) -> None:
        """A reply of the wrong shape: counted, and said once until Redis answers right."""
        self._event("malformed_reply")
        if not self._garbled:
            self._garbled = True
            log.error(
                "fleet.malformed_reply",
                error=what,
                node=self.node,
                hint="is a Redis server on the coordination address? on its own until it is",
            )
        self._reachable(False, logged=True)

    # -- Redis operations ---------------------------------------------------------------------

    async def _read(self, name: str, key: bytes, keys: FleetKeys) -> Sealed | None:
        blob = await self._call(
            lambda: self._client.get(keys.token),
            partial(fleet.value_reply, "GET", limit=MAX_REPLY),
            vouches=False,
        )
        if blob is None:
            return None
        try:
            return fleet.open_sealed(key, keys.token, blob)
        except Tampered as e:
            log.error("fleet.token_rejected", credential=name, error=str(e))
            self._event("rejected")
            return None

    async def _acquire(self, keys: FleetKeys) -> tuple[int, str]:
        ms = str(math.ceil(self.lease * 1000))
        out: tuple[int, str] = await self._call(
            lambda: self._client.eval(fleet.ACQUIRE, [keys.lease, keys.fence], [self.node, ms]),
            fleet.acquire_reply,
        )
        return out

    async def _renew(self, keys: FleetKeys, value: str, ms: str) -> bool:
        out: bool = await self._call(
            lambda: self._client.eval(fleet.RENEW, [keys.lease], [value, ms]),
            partial(fleet.flag_reply, "RENEW"),
        )
        return out

    async def publish(self, key: bytes, keys: FleetKeys, fence: int, grant: Grant) -> bool:
        """The fenced write of *grant*; False if a newer holder has taken over."""
        blob = fleet.seal(key, keys.token, fence, grant)
        ttl = max(1, math.ceil((grant.expires_at - self._clock()) * 1000))
        args: list[str | bytes] = [str(fence), blob, str(ttl), keys.channel]
        ok: bool = await self._call(
            lambda: self._client.eval(fleet.PUBLISH, [keys.fence, keys.token], args),
            partial(fleet.flag_reply, "PUBLISH"),
        )
        return ok

    # -- the seam in the supervisor's fetch ---------------------------------------------------

    async def exchange(self, rec: Record, fetch: Callable[[], Awaitable[Grant]]) -> Grant:
        """A token for *rec*: a newer shared one, or IMS's under the lease (published before
        it is returned). Raises :class:`Deferred` while another node holds the lease, and
        ImsError for a ``refresh_token`` credential while Redis is unreachable."""
        cred = rec.credential
        assert cred is not None
        name = cred.name
        key, keys = self._keys(cred)
        ours = rec.serving(cred.identity)
        try:
            shared = await self._read(name, key, keys)
            if fleet.adoptable(ours, shared.grant if shared else None, self._clock()):
                assert shared is not None
                self._event("adopted")
                log.debug("fleet.adopted", credential=name, fence=shared.fence)
                return shared.grant
            fence, holder = await self._acquire(keys)
            if fence == 0:
                self._holding(name, None)
                retry = self._clock() + max(0.5, min(self.lease / 2, 5.0))
                raise Deferred(retry, holder)
            if name not in self._held:
                self._event("lease_acquired")
                log.info("fleet.lease_acquired", credential=name, fence=fence, node=self.node)
            self._holding(name, (keys, f"{self.node}:{fence}"))
            shared = await self._read(name, key, keys)  # the last holder may just have published
            if fleet.adoptable(ours, shared.grant if shared else None, self._clock()):
                assert shared is not None
                self._event("adopted")
                return shared.grant
        except Unavailable as e:
            if not fleet.may_fall_back(cred):
                self._event("waiting")
                log.error("fleet.waiting_for_redis", credential=name, error=str(e))
                raise ImsError(
                    ImsErrorKind.TRANSIENT,
                    "coordination_unavailable",
                    "Redis is unreachable; a refresh_token credential waits for it "
                    "(a second writer would fork its chain)",
                ) from None
            self._event("fallback_local")
            log.error("fleet.fallback_local", credential=name, error=str(e))
            return await fetch()
        try:
            grant = await fetch()
        except ImsError:
            await self._release(name)  # not held by a node that cannot refresh
            raise
        try:
            if await self.publish(key, keys, fence, grant):
                self._event("published")
                self._unpublished.pop(name, None)
            else:
                self._holding(name, None)
                self._event("fenced_out")
                log.error("fleet.fenced_out", credential=name, fence=fence, node=self.node)
        except Unavailable as e:
            log.error("fleet.publish_failed", credential=name, error=str(e))
            if not fleet.may_fall_back(cred):
                self._unpublished[name] = (key, keys, grant)
        return grant

    async def _release(self, name: str) -> None:
        held = self._held.get(name)
        if held is None:
            return
        self._holding(name, None)
        keys, value = held
        with contextlib.suppress(Unavailable):
            await self._call(
                lambda: self._client.eval(fleet.RELEASE, [keys.lease], [value]),
                partial(fleet.flag_reply, "RELEASE"),
            )

    async def _republish(self) -> None:
        """Publish the chain links minted here whose publish failed, under the lease (taken
        again if it lapsed), unless Redis meanwhile holds a newer token."""
        for name, (key, keys, grant) in list(self._unpublished.items()):
            try:
                shared = await self._read(name, key, keys)
                if shared is not None and shared.grant.issued_at >= grant.issued_at:
                    self._unpublished.pop(name, None)
                    continue
                fence, _holder = await self._acquire(keys)
                if fence == 0:
                    continue  # another node's lease: try again when it lapses
                self._holding(name, (keys, f"{self.node}:{fence}"))
                if await self.publish(key, keys, fence, grant):
                    self._event("published")
                    log.warning("fleet.republished", credential=name, fence=fence)
                self._unpublished.pop(name, None)
            except Unavailable:
                continue

    # -- background tasks ---------------------------------------------------------------------

    async def run(
        self,
        supervisor: Supervisor,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        self._supervisor = supervisor
        async with self._client, anyio.create_task_group() as tg:
            self._pool_ready.set()
            tg.start_soon(self._subscriber)
            tg.start_soon(self._reconciler)
            tg.start_soon(self._renewer)
            task_status.started()

    async def _subscriber(self) -> None:
        channel = f"{self.prefix}:tokens"
        while True:
            try:
                pubsub = self._client.pubsub(channels=[channel], ignore_subscribe_messages=True)
                async with pubsub:
                    if not self._garbled:
                        self._reachable(True)
                    await self.reconcile()  # what was published while we were not listening
                    async for message in pubsub:
                        name = self._announced(message.get("data"))
                        if name is not None:
                            await self._follow(name)
            # except*: coredis's pubsub raises from its own task group (and, cancelled,
            # ClosedResourceError from its unsubscribe: the sleep below re-raises the cancel).
            except* (RedisError, OSError, TimeoutError, Unavailable, anyio.ClosedResourceError):
                self._reachable(False)
                log.debug("fleet.subscriber_lost")
            except* Exception as group:  # the client library choking on a hostile message
                self._malformed(f"the subscription failed ({type(group.exceptions[0]).__name__})")
            await anyio.sleep(1.0)

    def _announced(self, data: object) -> str | None:
        """The credential of ours a channel message names, if any. Anything from Redis is
        input: a message that is not a token key's name is dropped and counted (a key of
        another group or credential is simply not ours)."""
        try:
            token_key = fleet.announced(self.prefix, data)
        except fleet.Rejected as e:
            self._event("message_rejected")
            now = time.monotonic()
            if now - self._rejected_logged < REJECTED_LOG_EVERY:
                self._rejected_since += 1
                return None
            log.warning(
                "fleet.message_rejected",
                channel=f"{self.prefix}:tokens",
                reason=str(e),
                size=len(data) if isinstance(data, bytes | str) else None,
                suppressed=self._rejected_since,
                hint="dropped; sent by a client with PUBLISH rights (restrict them with an ACL)",
            )
            self._rejected_logged, self._rejected_since = now, 0
            return None
        return self._names.get(token_key)

    async def _follow(self, name: str) -> None:
        """Adopt *name*'s shared token if it is newer than ours."""
        sup = self._supervisor
        rec = sup.store.get(name) if sup is not None else None
        if sup is None or rec is None or rec.credential is None or rec.fetching is not None:
            return
        cred = rec.credential
        key, keys = self._keys(cred)
        try:
            shared = await self._read(name, key, keys)
        except Unavailable:
            return
        if shared is None or not fleet.adoptable(
            rec.serving(cred.identity), shared.grant, self._clock()
        ):
            return
        if await sup.adopt(name, cred.identity, shared.grant):
            self._event("adopted")
            log.debug("fleet.adopted", credential=name, fence=shared.fence)

    async def reconcile(self) -> None:
        sup = self._supervisor
        if sup is None:
            return
        for rec in list(sup.store):
            if rec.credential is not None:
                await self._follow(rec.name)

    async def _reconciler(self) -> None:
        while True:
            await anyio.sleep(self.reconcile_interval)
            with contextlib.suppress(Unavailable):
                await self.reconcile()

    async def _renewer(self) -> None:
        ms = str(math.ceil(self.lease * 1000))
        # Concurrently: renewing hundreds of leases one round trip at a time outlasted a
        # short lease on a loaded machine (46 of 100 lost with a 2 s lease in the bench).
        limit = anyio.CapacityLimiter(32)
        while True:
            await anyio.sleep(self.lease / 3)
            await self._republish()
            async with anyio.create_task_group() as tg:
                for name, (keys, value) in list(self._held.items()):
                    tg.start_soon(self._renew_one, limit, name, keys, value, ms)

    async def _renew_one(
        self, limit: anyio.CapacityLimiter, name: str, keys: FleetKeys, value: str, ms: str
    ) -> None:
        async with limit:
            try:
                ok = await self._renew(keys, value, ms)
            except Unavailable:
                return
        held = self._held.get(name)
        if not ok and held is not None and held[1] == value:
            self._holding(name, None)
            self._event("lease_lost")
            log.warning("fleet.lease_lost", credential=name, node=self.node)


def read_password(file: Path | None, env_name: str | None, env: Mapping[str, str]) -> str | None:
    """The Redis password from the file or the environment variable the config names."""
    if file is not None:
        return file.read_text().strip() or None
    if env_name:
        return env.get(env_name) or None
    return None
