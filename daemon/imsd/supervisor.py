"""The supervisor: drives the records of :mod:`imsd.scheduler` with one timer heap.

Theory of operation
-------------------
The token store holds one frozen :class:`~imsd.scheduler.Record` per credential; only this
module replaces them, always through a pure transition of :mod:`imsd.scheduler`, whose
effects it then carries out in order (save the state, write the files, notify plugins, run
the ``on_refresh`` action).

One timer task owns a heap of ``(wake_at, seq, name)`` with lazy deletion (a record's
current entry is the one in ``_scheduled``; older ones are skipped when popped). It sleeps
until the top is due, an event wakes it, or ``recheck_interval`` passes (the heap holds
wall-clock times and the sleep is monotonic: a suspended machine or a clock step is noticed
within that interval). Due fetches go to a queue drained by at most ``max_fetches`` fetch
tasks; due write retries get a task of their own. Tasks, flight events, cancel scopes and
locks exist only while a fetch, a write or an action is in progress, so an idle credential
costs its record and one heap entry.

A fetch is single-flight: a forced refresh arriving during one waits for it. The answer is
applied to the record as it is when the answer arrives, so a credential changed meanwhile
discards it and fetches again (the record carries the identity in flight).
"""

from __future__ import annotations

import collections
import heapq
import itertools
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

import anyio
import anyio.abc
import structlog

from imsd import scheduler
from imsd.actions import run_action
from imsd.catalog import Added, Changed, Event, Failed, Removed, Resolved
from imsd.discovery import Discoveries
from imsd.fleet import Deferred, Exchange, deferred
from imsd.flows import Flow, flow_for
from imsd.model import Credential, CredentialError, Grant, ImsError, ImsErrorKind
from imsd.persist import StateFile, Stored
from imsd.plugin import AuthMethod, HasNotice, Product
from imsd.registry import validate_products
from imsd.render import RenderError, render_safe, rfc3339
from imsd.schedule import ClockWatch, RefreshPolicy
from imsd.scheduler import Record, Step
from imsd.sinks import SinkError
from imsd.store import TokenStore

__all__ = ["Notify", "Observer", "Sink", "Supervisor", "TokenClient"]

log = structlog.get_logger("imsd.supervisor")

#: Longest delay before a new access token reaches the state file (restarts reuse it).
SAVE_INTERVAL: Final = 1.0


class TokenClient(Protocol):
    async def run(self, flow: Flow) -> Grant: ...


class Notify(Protocol):
    """Blocking notification fan-out (plugins); called in a worker thread."""

    def __call__(self, hook: str, /, **kwargs: Any) -> None: ...


class Observer(Protocol):
    """Where refresh outcomes are counted (:class:`imsd.metrics.Metrics`)."""

    def added(self, credential: str) -> None: ...

    def refreshed(self, credential: str, result: str, duration: float) -> None: ...

    def forget(self, credential: str) -> None: ...


class Sink(Protocol):
    def write(self, name: str, files: Mapping[str, bytes]) -> None: ...

    def remove(self, name: str) -> None: ...

    def in_memory(self) -> bool: ...


class Supervisor:
    def __init__(
        self,
        *,
        client: TokenClient,
        sink: Sink,
        products: Mapping[str, Product],
        auth_methods: Mapping[str, AuthMethod] | None = None,
        policy: RefreshPolicy | None = None,
        store: TokenStore | None = None,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        notify: Notify | None = None,
        notify_wants: Callable[[str], bool] | None = None,
        observer: Observer | None = None,
        output_dir: str = "",
        state: StateFile | None = None,
        max_fetches: int = 8,
        retry_until: float | None = None,
        fleet: Exchange | None = None,
    ) -> None:
        self.client = client
        self.fleet = fleet  # fleet mode: the IMS call goes through the shared lease
        self.sink = sink
        self.products = products
        if auth_methods is None:
            from imsd.credentials import builtin_auth_methods

            auth_methods = builtin_auth_methods()
        self.auth_methods = auth_methods
        self.policy = policy or RefreshPolicy()
        self.store = store if store is not None else TokenStore()
        # Products' discovered options (Analytics' company id), with the IMS client's send
        # (test doubles without one get a discovery error, not a crash).
        self.discovery = Discoveries(getattr(client, "send", None))
        self._clock = clock
        self._rand = rand
        self._notify = notify
        self._notify_wants = notify_wants
        self._observer = observer
        self._state = state
        self._restorable: dict[str, Stored] = state.load() if state is not None else {}
        self._output_dir = output_dir
        self._retry_until = retry_until  # imsd once: no retry after this (clock) time
        self._restored = 0  # tokens reused from the state dir since the last summary
        # The timer heap.
        self._heap: list[tuple[float, int, str]] = []
        self._scheduled: dict[str, tuple[float, int]] = {}
        self._seq = itertools.count()
        self._wake = anyio.Event()
        self._heartbeat = time.monotonic()
        # Work in progress, and only while it is.
        self._queue: collections.deque[str] = collections.deque()
        self._queued: set[str] = set()
        self._fetches = 0
        self._max_fetches = max(1, max_fetches)
        self._progress = time.monotonic()  # when a fetch last finished
        self._active = 0  # fetch and write tasks running
        self._idle = anyio.Event()
        self._flights: dict[str, anyio.Event] = {}
        self._scopes: dict[str, anyio.CancelScope] = {}
        self._flows: dict[str, Flow] = {}
        self._writes: dict[str, anyio.Lock] = {}
        self._actions: dict[str, anyio.Lock] = {}
        self._notice_of: dict[int, tuple[object, str | None]] = {}
        # Credentials whose first attempt has not finished (READY waits for them).
        self._unattempted: set[str] = set()
        self._attempts_done = anyio.Event()
        # State saves: group commit, at most one per SAVE_INTERVAL unless urgent.
        self._save_lock = anyio.Lock()
        self._dirty = anyio.Event()
        self._save_requested = self._saved = 0
        # Names whose record changed since the last save: a save writes only their rows,
        # except the first (and any after a failure or a new database), which writes all.
        self._unsaved: set[str] = set()
        self._save_all = True
        self._tg: anyio.abc.TaskGroup | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Own the timer, the saver and every fetch, write and action task until cancelled."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._saver)
            tg.start_soon(self._timer)
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                self._tg = None
                if self._dirty.is_set():  # what the saver had not written yet
                    with anyio.CancelScope(shield=True):
                        await self._save_state()

    async def _saver(self) -> None:
        """Save new access tokens at most once per :data:`SAVE_INTERVAL` (a rotated refresh
        token is saved at once instead, see :func:`imsd.scheduler.fetch_succeeded`)."""
        while True:
            await self._dirty.wait()
            self._dirty = anyio.Event()
            await self._save_state()
            await anyio.sleep(SAVE_INTERVAL)

    async def wait_first_attempts(self) -> None:
        """Return once every current credential has finished its first attempt (a fetch,
        or the write of a token restored from the state dir)."""
        while self._unattempted:
            await self._attempts_done.wait()

    # -- the timer ---------------------------------------------------------------------------

    async def _timer(self) -> None:
        watch = ClockWatch(self._clock(), time.monotonic())
        while True:
            now = self._clock()
            self._heartbeat = time.monotonic()
            self._dispatch(now)
            delay = self.policy.recheck_interval
            if self._heap:
                delay = min(delay, max(0.0, self._heap[0][0] - now))
            with anyio.move_on_after(delay):
                await self._wake.wait()
            if self._wake.is_set():
                self._wake = anyio.Event()
            drift = watch.jumped(self._clock(), time.monotonic())
            if drift is not None:
                log.info("clock.jumped", seconds=round(drift, 1), credentials=len(self.store))

    def _schedule(self, name: str) -> None:
        """Put *name*'s current wake time on the heap (replacing its earlier entry)."""
        rec = self.store.get(name)
        at = rec.wake_at() if rec is not None else math.inf
        current = self._scheduled.get(name)
        if current is not None and current[0] == at:
            return
        if math.isinf(at):
            self._scheduled.pop(name, None)
            return
        seq = next(self._seq)
        self._scheduled[name] = (at, seq)
        if not self._heap or at < self._heap[0][0]:
            self._wake.set()
        heapq.heappush(self._heap, (at, seq, name))
        if len(self._heap) > 2 * len(self._scheduled) + 64:  # drop the skipped entries
            self._heap = [(a, s, n) for n, (a, s) in self._scheduled.items()]
            heapq.heapify(self._heap)

    def _dispatch(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            at, seq, name = heapq.heappop(heap)
            if self._scheduled.get(name) != (at, seq):
                continue  # replaced by a later entry
            del self._scheduled[name]
            rec = self.store.get(name)
            if rec is None:
                continue
            fetch_due = rec.credential is not None and rec.fetching is None and rec.due <= now
            if fetch_due and name not in self._queued:
                self._queued.add(name)
                self._queue.append(name)
            if rec.write_pending and rec.write_due <= now and self._tg is not None:
                self._active += 1  # counted from now: run_due() must wait for it
                self._tg.start_soon(self._write_task, name, name=f"imsd-write-{name}")
        self._start_fetches()

    def _start_fetches(self) -> None:
        while self._queue and self._fetches < self._max_fetches and self._tg is not None:
            name = self._queue.popleft()
            self._queued.discard(name)
            self._fetches += 1
            self._active += 1
            self._tg.start_soon(self._fetch_task, name, name=f"imsd-fetch-{name}")

    async def _fetch_task(self, name: str) -> None:
        try:
            await self._fetch(name)
        finally:
            self._fetches -= 1
            self._progress = time.monotonic()
            self._start_fetches()
            self._done()

    async def _write_task(self, name: str) -> None:
        try:
            rec = self.store.get(name)
            if rec is not None and rec.write_pending and rec.grant is not None:
                await self._write(name, rec.grant)
            self._schedule(name)
        finally:
            self._done()

    def _done(self) -> None:
        self._active -= 1
        if not self._active and not self._queue:
            self._idle.set()
            self._idle = anyio.Event()

    async def run_due(self) -> None:
        """Carry out everything due at the clock's current time, and return when no fetch
        or write is left in progress (tests drive a fake clock with it)."""
        while True:
            self._dispatch(self._clock())
            if not self._active and not self._queue:
                return
            await self._idle.wait()

    @property
    def pending_timers(self) -> int:
        """Credentials with a wake time on the heap."""
        return len(self._scheduled)

    # -- records -----------------------------------------------------------------------------

    def _put(self, rec: Record) -> None:
        self.store.put(rec)
        self._unsaved.add(rec.name)
        if rec.credential is not None and not rec.attempted:
            self._unattempted.add(rec.name)

    def _settle(self, name: str) -> None:
        """Count *name*'s first attempt as finished once its effects (files written, plugins
        told) are done: READY and ``imsd once`` come after them."""
        rec = self.store.get(name)
        if name in self._unattempted and (rec is None or rec.credential is None or rec.attempted):
            self._unattempted.discard(name)
            if not self._unattempted:
                self._attempts_done.set()
                self._attempts_done = anyio.Event()

    async def _apply(self, step: Step) -> None:
        """Install a transition's record, then carry out its effects in order."""
        rec, effects = step
        self._put(rec)
        name = rec.name
        for effect in effects:
            if isinstance(effect, scheduler.Save):
                if effect.urgent:
                    await self._save_state()
                else:
                    self._dirty.set()
            elif isinstance(effect, scheduler.Write):
                await self._write(name, effect.grant)
            elif isinstance(effect, scheduler.Notify):
                await self._notify_hook(name, effect.hook, effect.kwargs)
            # No task (nor lock) per refresh for the many credentials without an action.
            elif isinstance(effect, scheduler.RunAction) and self._tg and self._has_action(name):
                self._tg.start_soon(self._on_refresh, name, name=f"imsd-on-refresh-{name}")
            # Fetch: the record is due now; the heap below hands it to a fetch task.
        self._schedule(name)
        self._settle(name)

    # -- events ------------------------------------------------------------------------------

    async def apply(self, events: Sequence[Event]) -> None:
        for event in events:
            if isinstance(event, Added):
                await self._added(event.cred)
            elif isinstance(event, Changed):
                await self._changed(event.new)
            elif isinstance(event, Removed):
                await self._removed(event.cred.name)
            elif isinstance(event, Failed):
                await self._failed(event)
            elif isinstance(event, Resolved):
                await self._resolved(event)
        if self._restored:
            log.info("state.restored", tokens=self._restored, ims_requests_saved=self._restored)
            self._restored = 0

    def _validated(self, cred: Credential) -> Credential | None:
        try:
            return validate_products(cred, self.products)
        except CredentialError as e:
            old = self.store.get(cred.name)
            kept = old is not None and old.credential is not None
            if old is None:
                old = Record(cred.name, cred.path)
            self._put(scheduler.file_failed(old, str(e))[0])
            log.error("credential.invalid", credential=cred.name, error=str(e), kept=kept)
            return None

    def _notice(self, plugin: object) -> str | None:
        """*plugin*'s notice, looked up once per plugin object: a runtime protocol's
        isinstance costs 9 µs, twice per credential added."""
        try:
            return self._notice_of[id(plugin)][1]
        except KeyError:
            notice = plugin.notice if isinstance(plugin, HasNotice) else None
            self._notice_of[id(plugin)] = (plugin, notice)  # holding it keeps its id unique
            return notice

    def _notices(self, cred: Credential) -> None:
        for product in cred.products:
            if notice := self._notice(self.products[product]):
                log.warning("product.notice", credential=cred.name, product=product, notice=notice)
        if notice := self._notice(self.auth_methods.get(cred.auth)):
            log.warning("auth.notice", credential=cred.name, auth=cred.auth, notice=notice)

    async def _added(self, cred: Credential) -> None:
        existing = self.store.get(cred.name)
        if existing is not None and existing.credential is not None:
            await self._changed(cred)
            return
        valid = self._validated(cred)
        if valid is None:
            return
        self._notices(valid)
        log.info(
            "credential.added",
            credential=valid.name,
            path=str(valid.path),
            products=list(valid.products),
        )
        if self._observer is not None:
            self._observer.added(valid.name)
        rec, effects = scheduler.added(valid.name, valid.path, valid, self._clock())
        stored = self._restorable.pop(valid.name, None)
        if stored is not None:
            rec, effects = self._restore(rec, stored, effects)
        await self._apply((rec, effects))

    def _restore(self, rec: Record, stored: Stored, effects: tuple[scheduler.Effect, ...]) -> Step:
        """Reuse what a previous run saved under the same identity: the newest refresh token
        of a rotating chain, and a token still valid (fetched again at once when it is
        inside its margin, but served meanwhile)."""
        assert rec.credential is not None
        if stored.identity != rec.credential.identity:
            log.info("token.not_restored", credential=rec.name, reason="credential changed")
            return rec, effects
        now = self._clock()
        new, restored = scheduler.restored(
            rec,
            identity=stored.identity,
            grant=stored.grant,
            refresh_token=stored.refresh_token,
            now=now,
            policy=self.policy,
            rand=self._rand(),
        )
        if new.grant is None:
            if stored.grant is not None:
                log.info("token.not_restored", credential=rec.name, reason="expired")
            return new, effects
        log.debug("token.restored", credential=rec.name, expires_at=rfc3339(new.grant.expires_at))
        self._restored += 1
        return new, restored

    async def _changed(self, cred: Credential) -> None:
        rec = self.store.get(cred.name)
        if rec is None or rec.credential is None:
            await self._added(cred)
            return
        valid = self._validated(cred)
        if valid is None:
            return
        log.info("credential.changed", credential=valid.name)
        await self._apply(scheduler.changed(rec, valid, self._clock()))

    async def _removed(self, name: str) -> None:
        scope = self._scopes.pop(name, None)
        if scope is not None:
            scope.cancel()
        self.store.remove(name)
        self._unsaved.add(name)
        self.discovery.forget(name)
        self._scheduled.pop(name, None)
        self._settle(name)
        if self._observer is not None:
            self._observer.forget(name)
        try:
            await anyio.to_thread.run_sync(self.sink.remove, name)
        except (SinkError, OSError) as e:
            log.error("sink.remove_failed", credential=name, error=str(e))
        log.info("credential.removed", credential=name)

    async def _failed(self, event: Failed) -> None:
        key = event.name or event.path.stem
        other = self.store.get(key)
        if event.name is None and other is not None and other.path != event.path:
            key = event.path.name  # don't pin this file's error on another file's credential
        rec = self.store.get(key) or Record(key, event.path)
        kept = event.kept is not None and rec.credential is not None
        log.error("credential.invalid", credential=key, error=str(event.error), kept=kept)
        await self._apply(scheduler.file_failed(rec, str(event.error)))

    async def _resolved(self, event: Resolved) -> None:
        for rec in self.store:
            if rec.path != event.path:
                continue
            if rec.credential is None:
                self.store.remove(rec.name)  # an invalid file that is gone or fixed
                self._unsaved.add(rec.name)
            else:
                await self._apply(scheduler.file_resolved(rec))

    # -- state file --------------------------------------------------------------------------

    async def _save_state(self) -> None:
        """Persist the store (group commit): return once a save that began after this call
        has finished, so concurrent refreshes share one write instead of one each."""
        if self._state is None:
            return
        self._save_requested += 1
        mine = self._save_requested
        async with self._save_lock:
            if self._saved >= mine:
                return  # a save that started after our request covered us
            covered = self._save_requested
            await self._write_state(self._state)
            self._saved = covered

    def _stored(self, rec: Record | None) -> Stored | None:
        """What the state dir keeps of *rec* (None: nothing)."""
        if rec is None:
            return None
        cred = rec.credential
        if cred is None:
            # A file broken since the start: what the last run saved stays saved until
            # the file is fixed (its token may still be good then).
            return self._restorable.get(rec.name)
        identity = cred.identity
        grant = rec.serving(identity)  # never an old identity's token under the new one
        if grant is None and rec.refresh_token is None:
            return None
        return Stored(identity, grant, rec.refresh_token)

    async def _write_state(self, state: StateFile) -> None:
        names, self._unsaved = self._unsaved, set()
        full, self._save_all = self._save_all, False
        get = self.store.get
        try:
            if full:
                entries = {r.name: s for r in self.store if (s := self._stored(r)) is not None}
                await anyio.to_thread.run_sync(lambda: state.save(entries))
            else:
                changes = {n: self._stored(get(n)) for n in names}
                if not await anyio.to_thread.run_sync(lambda: state.put(changes)):
                    self._save_all = True  # a new database: the next save fills it
                    self._dirty.set()
        except OSError as e:
            log.error("state.save_failed", path=str(state.path), error=str(e))
            self._save_all = True  # what this save missed is written by the next

    # -- fetching ----------------------------------------------------------------------------

    async def refresh(self, name: str) -> Record:
        """Fetch a new token for *name* now (single-flight) and return its record afterwards.
        Raises KeyError for an unknown or never-valid credential."""
        rec = self.store.get(name)
        if rec is None or rec.credential is None:
            raise KeyError(name)
        await self._fetch(name)
        rec = self.store.get(name)
        if rec is None:
            raise KeyError(name)
        return rec

    def forced_refresh_at(self, name: str, min_interval: float) -> float | None:
        """See :func:`imsd.scheduler.forced_refresh_at`. Raises KeyError for an unknown
        credential."""
        rec = self.store.get(name)
        if rec is None:
            raise KeyError(name)
        return scheduler.forced_refresh_at(rec, min_interval)

    async def _fetch(self, name: str) -> None:
        flight = self._flights.get(name)
        if flight is not None:  # single-flight: share the attempt in progress
            await flight.wait()
            return
        rec = self.store.get(name)
        if rec is None or rec.credential is None:
            return
        flight = self._flights[name] = anyio.Event()
        try:
            with anyio.CancelScope() as scope:
                self._scopes[name] = scope
                await self._attempt(rec)
        finally:
            if self._scopes.get(name) is scope:
                del self._scopes[name]
            self._flows.pop(name, None)
            del self._flights[name]
            flight.set()
            self._schedule(name)

    async def _attempt(self, rec: Record) -> None:
        started = self._clock()
        rec = scheduler.fetch_started(rec, started)
        self._put(rec)
        self._schedule(rec.name)
        cred = rec.credential
        assert cred is not None
        identity = cred.identity
        try:
            try:
                flow = flow_for(
                    cred, self.auth_methods, now=started, refresh_token=rec.refresh_token
                )
            except CredentialError as e:  # the method's plugin is gone (a reload)
                raise ImsError(ImsErrorKind.PERMANENT, "unsupported_auth", e.reason) from None
            self._flows[rec.name] = flow
            fetched = self.fleet is None  # in fleet mode: False if another node's was taken
            if self.fleet is None:
                grant = await self.client.run(flow)
            else:

                async def fetch() -> Grant:
                    nonlocal fetched
                    fetched = True
                    return await self.client.run(flow)

                grant = await self.fleet.exchange(rec, fetch)
        except Deferred as d:  # another node holds the lease: its token will come
            current = self.store.get(rec.name)
            if current is not None:
                await self._apply(deferred(current, identity, d.until, self._clock()))
            return
        except ImsError as e:
            now = self._clock()
            if self._observer is not None:
                self._observer.refreshed(rec.name, e.kind.value, now - started)
            current = self.store.get(rec.name)
            if current is None:
                return
            step = scheduler.fetch_failed(current, identity, e, now, self.policy, self._rand())
            failed = step[0]
            level = log.error if e.kind is ImsErrorKind.PERMANENT else log.warning
            until = self._retry_until
            retries = until is None or (e.kind is not ImsErrorKind.PERMANENT and failed.due < until)
            level(
                "token.refresh_failed",
                credential=rec.name,
                error=str(e),
                kind=e.kind.value,
                failures=failed.consecutive_failures,
                state=failed.state(now).value,
                **({"debug_id": e.debug_id} if e.debug_id else {}),
                **({"retry_in": round(max(0.0, failed.due - now), 1)} if retries else {}),
            )
            await self._apply(step)
            return
        now = self._clock()
        if self._observer is not None:
            self._observer.refreshed(rec.name, "success" if fetched else "adopted", now - started)
        current = self.store.get(rec.name)
        if current is None:
            return
        step = scheduler.fetch_succeeded(current, identity, grant, now, self.policy, self._rand())
        if step[0].grant is grant:
            log.info(
                "token.refreshed" if fetched else "token.adopted",
                credential=rec.name,
                expires_at=rfc3339(grant.expires_at),
                next_refresh_in=round(max(0.0, step[0].due - now), 1),
                duration_ms=round((now - started) * 1000, 1),
            )
        else:
            log.info("token.discarded", credential=rec.name, reason="credential changed")
        await self._apply(step)

    async def adopt(self, name: str, identity: str, grant: Grant) -> bool:
        """Install a token another node of the fleet obtained (as if fetched), unless a fetch
        is in flight or the credential changed; True if it was."""
        rec = self.store.get(name)
        if rec is None or rec.fetching is not None or rec.credential is None:
            return False
        if rec.credential.identity != identity:
            return False
        now = self._clock()
        step = scheduler.fetch_succeeded(rec, identity, grant, now, self.policy, self._rand())
        if self._observer is not None:
            self._observer.refreshed(name, "adopted", 0.0)
        log.info(
            "token.adopted",
            credential=name,
            expires_at=rfc3339(grant.expires_at),
            next_refresh_in=round(max(0.0, step[0].due - now), 1),
        )
        await self._apply(step)
        return True

    # -- writing -----------------------------------------------------------------------------

    async def _write(self, name: str, grant: Grant) -> None:
        """Write *grant*'s files, one writer per credential, and only while it is current."""
        lock = self._writes.get(name)
        if lock is None:
            # fast_acquire: an uncontended lock (nearly always) costs no trip to the loop
            lock = self._writes[name] = anyio.Lock(fast_acquire=True)
        try:
            async with lock:
                await self._write_locked(name, grant)
        finally:
            if not lock.locked() and self._writes.get(name) is lock:
                del self._writes[name]

    async def _write_locked(self, name: str, grant: Grant) -> None:
        rec = self.store.get(name)
        if rec is None or rec.credential is None or rec.grant is not grant:
            return
        cred = await self.discovery.resolve(rec.credential, grant, self.products)
        rec = self.store.get(name)
        if rec is None or rec.credential is None or rec.grant is not grant:
            return  # changed during the discovery: its own write follows
        try:
            files, left_out = render_safe(cred, grant, self.products)
            if self.sink.in_memory():  # no device to wait for: cheaper than a thread hop
                self.sink.write(name, files)
            else:
                await anyio.to_thread.run_sync(self.sink.write, name, files)
        except (RenderError, SinkError, OSError) as e:
            current = self.store.get(name)
            if current is None:
                return
            step = scheduler.write_failed(
                current, grant, str(e), self._clock(), self.policy, self._rand()
            )
            log.error(
                "sink.write_failed",
                credential=name,
                error=str(e),
                attempt=step[0].write_attempt,
            )
            await self._apply(step)
            return
        log.debug("sink.written", credential=name, files=sorted(files))
        current = self.store.get(name)
        if current is None:
            return
        missing = "; ".join(map(str, left_out)) or None
        if missing:
            log.error(
                "sink.outputs_incomplete",
                credential=name,
                error=scheduler.WRITE_ERROR_PREFIX + missing,
            )
        await self._apply(scheduler.write_succeeded(current, grant, self._clock(), missing))

    # -- notifications -----------------------------------------------------------------------

    async def _notify_hook(self, name: str, hook: str, kwargs: Mapping[str, Any]) -> None:
        if self._notify is None or (
            self._notify_wants is not None and not self._notify_wants(hook)
        ):
            return  # nobody listens: the extras below are not worth computing
        extra: dict[str, Any] = {}
        if hook == "imsd_credential_failed":
            rec = self.store.get(name)
            extra["state"] = rec.state(self._clock()).value if rec else "invalid"
        elif hook == "imsd_token_refreshed":
            extra["output_dir"] = str(Path(self._output_dir) / name)
        await self._call_plugins(hook, **kwargs, **extra)

    def _has_action(self, name: str) -> bool:
        rec = self.store.get(name)
        return (
            rec is not None and rec.credential is not None and rec.credential.on_refresh is not None
        )

    async def _on_refresh(self, name: str) -> None:
        """The credential's ``on_refresh`` action, off the refresh path (a slow command never
        delays a refresh) and one at a time per credential."""
        lock = self._actions.get(name)
        if lock is None:
            lock = self._actions[name] = anyio.Lock(fast_acquire=True)
        try:
            async with lock:
                rec = self.store.get(name)
                action = rec.credential.on_refresh if rec and rec.credential else None
                if action is not None:
                    await run_action(
                        action, credential=name, output_dir=Path(self._output_dir) / name
                    )
        finally:
            if not lock.locked() and self._actions.get(name) is lock:
                del self._actions[name]

    async def _call_plugins(self, hook: str, **kwargs: Any) -> None:
        if self._notify_wants is not None and not self._notify_wants(hook):
            return  # nobody implements it: no thread hop per refresh
        if self._notify is not None:
            notify = self._notify
            await anyio.to_thread.run_sync(lambda: notify(hook, **kwargs))

    # -- watchdog ----------------------------------------------------------------------------

    def stuck(self, now: float, grace: float) -> list[str]:
        """What keeps the scheduler from making progress, if anything: the timer has not run
        for longer than its re-check interval plus *grace*, queued fetches have not moved
        for *grace*, or an IMS exchange has outlived the client's deadline by *grace*. The
        watchdog stops pinging systemd while this is not empty."""
        mono = time.monotonic()
        out: list[str] = []
        if mono - self._heartbeat > self.policy.recheck_interval + grace:
            out.append("(timer)")
        if self._queue and self._fetches and mono - self._progress > grace:
            out.append("(fetch queue)")
        overran = getattr(self.client, "overran", None)  # ImsClient's; test doubles lack it
        if overran is not None:
            out += [name for name, flow in self._flows.items() if overran(flow, grace)]
        return out
