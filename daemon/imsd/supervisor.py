"""The supervisor: one refresh loop per credential, driven by catalog events.

Theory of operation
-------------------
The watcher hands :meth:`Supervisor.apply` the catalog's events. ``Added`` starts a worker
task for the credential; ``Changed`` swaps the worker's credential and either fetches at once
(the identity — client id, secret, scopes, IMS host — changed, or the last attempt failed) or
only re-renders the files from the current token (products, outputs, headers changed);
``Removed`` cancels the worker and removes the credential's output directory; ``Failed``
records the file's error and, when the catalog kept a last good version, leaves that version
running.

A worker loops: when its wall-clock ``next_at`` has come it fetches a token through the IMS
client (single-flight: a forced refresh arriving meanwhile waits for the same attempt), writes
the files, and computes the next time with the pure functions of :mod:`imsd.schedule`. It
never sleeps longer than the re-check interval, so a suspended machine or a clock jump is
noticed within that interval. A failed attempt keeps the last token in the store and on disk
(``stale``) until it expires (``expired``); a failed write is retried on its own schedule
without a new IMS request.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import anyio
import anyio.abc
import structlog

from imsd.actions import run_action
from imsd.catalog import Added, Changed, Event, Failed, Removed, Resolved
from imsd.flows import Flow, flow_for
from imsd.model import Credential, CredentialError, Grant, ImsError, ImsErrorKind, Secret
from imsd.persist import StateFile, Stored
from imsd.plugin import AuthMethod, Product
from imsd.registry import validate_products
from imsd.render import RenderError, render_safe, rfc3339
from imsd.schedule import (
    ClockWatch,
    RefreshPolicy,
    next_refresh_at,
    retry_at,
    sleep_for,
    write_retry_at,
)
from imsd.sinks import SinkError
from imsd.store import Entry, TokenStore

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


@dataclass(eq=False, slots=True)
class _Worker:
    cred: Credential
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    wake: anyio.Event = field(default_factory=anyio.Event)
    next_at: float = 0.0  # wall clock; 0 = fetch now
    write_pending: bool = False  # the current grant is not on disk yet
    write_attempt: int = 0
    flight: anyio.Event | None = None  # set when the in-flight fetch ends
    flow: Flow | None = None  # the in-flight fetch's flow (the watchdog asks the client)
    last_kind: ImsErrorKind | None = None  # kind of the last failed attempt
    announced: Grant | None = None  # the last grant plugins were told about
    done: anyio.Event = field(default_factory=anyio.Event)  # set after the first attempt
    refresh_token: Secret | None = None  # newest of a rotating chain (auth = refresh_token)
    attempted_at: float = -math.inf  # wall clock when the last IMS attempt began
    action_lock: anyio.Lock = field(default_factory=anyio.Lock)


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
    ) -> None:
        self.client = client
        self.sink = sink
        self.products = products
        if auth_methods is None:
            from imsd.credentials import builtin_auth_methods

            auth_methods = builtin_auth_methods()
        self.auth_methods = auth_methods
        self.policy = policy or RefreshPolicy()
        self.store = store if store is not None else TokenStore()
        self._clock = clock
        self._rand = rand
        self._notify = notify
        self._notify_wants = notify_wants
        self._observer = observer
        self._state = state
        self._restorable: dict[str, Stored] = state.load() if state is not None else {}
        self._output_dir = output_dir
        self._restored = 0  # tokens reused from the state dir since the last summary
        self._save_lock = anyio.Lock()
        self._dirty = anyio.Event()  # access tokens changed since the last save
        self._save_requested = self._saved = 0  # group-commit generations
        self._workers: dict[str, _Worker] = {}
        self._tg: anyio.abc.TaskGroup | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Own the workers' task group until cancelled."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._saver)
            tg.start_soon(self._watch_clock)
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                self._tg = None
                if self._dirty.is_set():  # what the saver had not written yet
                    with anyio.CancelScope(shield=True):
                        await self._save_state()

    async def _saver(self) -> None:
        """Save new access tokens at most once per :data:`SAVE_INTERVAL`: the state file
        holds every credential, so saving it per refresh would cost O(N) each time (a
        rotated refresh token is saved at once instead, see :meth:`_attempt`)."""
        while True:
            await self._dirty.wait()
            self._dirty = anyio.Event()
            await self._save_state()
            await anyio.sleep(SAVE_INTERVAL)

    async def wait_first_attempts(self) -> None:
        """Return once every current credential has finished its first fetch attempt."""
        for worker in list(self._workers.values()):
            await worker.done.wait()

    # -- events ------------------------------------------------------------------------------

    async def apply(self, events: Sequence[Event]) -> None:
        for event in events:
            if isinstance(event, Added):
                await self._added(event.cred)
            elif isinstance(event, Changed):
                await self._changed(event.old, event.new)
            elif isinstance(event, Removed):
                await self._removed(event.cred.name)
            elif isinstance(event, Failed):
                await self._failed(event)
            elif isinstance(event, Resolved):
                self._resolved(event)
        if self._restored:
            log.info("state.restored", tokens=self._restored, ims_requests_saved=self._restored)
            self._restored = 0

    async def _added(self, cred: Credential) -> None:
        entry = self.store.upsert(cred.name, cred.path)
        try:
            cred = validate_products(cred, self.products)
        except CredentialError as e:
            entry.file_error = str(e)
            log.error("credential.invalid", credential=cred.name, error=str(e))
            return
        entry.credential, entry.file_error = cred, None
        for product in cred.products:
            notice = getattr(self.products[product], "notice", None)
            if notice:
                log.warning(
                    "product.notice", credential=cred.name, product=product, notice=str(notice)
                )
        notice = getattr(self.auth_methods.get(cred.auth), "notice", None)
        if notice:
            log.warning("auth.notice", credential=cred.name, auth=cred.auth, notice=str(notice))
        log.info(
            "credential.added",
            credential=cred.name,
            path=str(cred.path),
            products=list(cred.products),
        )
        self._start(cred)

    async def _changed(self, old: Credential, new: Credential) -> None:
        worker = self._workers.get(old.name)
        entry = self.store.upsert(new.name, new.path)
        try:
            new = validate_products(new, self.products)
        except CredentialError as e:
            entry.file_error = str(e)
            log.error(
                "credential.invalid", credential=new.name, error=str(e), kept=worker is not None
            )
            return
        entry.file_error = None
        entry.credential = new
        log.info("credential.changed", credential=new.name)
        if worker is None:
            self._start(new)
            return
        same = new.identity == worker.cred.identity
        refetch = not same or entry.consecutive_failures > 0
        if not same:  # a new login's refresh token starts a new chain
            worker.refresh_token = None
        worker.cred = new
        if refetch or entry.grant is None:
            worker.next_at = 0.0
        else:
            worker.write_pending = True
        worker.wake.set()

    async def _removed(self, name: str) -> None:
        worker = self._workers.pop(name, None)
        if worker is not None:
            worker.scope.cancel()
        self.store.remove(name)
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
        entry = self.store.upsert(key, event.path)
        entry.file_error = str(event.error)
        kept = event.kept is not None and key in self._workers
        log.error("credential.invalid", credential=key, error=str(event.error), kept=kept)
        await self._announce_failure(key, str(event.error))

    def _resolved(self, event: Resolved) -> None:
        for entry in self.store:
            if entry.path != event.path:
                continue
            if entry.credential is None:
                self.store.remove(entry.name)  # an invalid file that is gone or fixed
            else:
                entry.file_error = None

    def _start(self, cred: Credential) -> None:
        if self._tg is None:
            raise RuntimeError("Supervisor.run() is not running")
        old = self._workers.pop(cred.name, None)
        if old is not None:
            old.scope.cancel()
        worker = self._workers[cred.name] = _Worker(cred)
        if self._observer is not None:
            self._observer.added(cred.name)
        self._restore(worker)
        self._tg.start_soon(self._loop, worker, name=f"imsd-credential-{cred.name}")

    def _restore(self, w: _Worker) -> None:
        """Reuse what a previous run saved under the same identity: the newest refresh token
        of a rotating chain, and a token still valid beyond the margin."""
        stored = self._restorable.pop(w.cred.name, None)
        if stored is None:
            return
        if stored.identity != w.cred.identity:
            log.info("token.not_restored", credential=w.cred.name, reason="credential changed")
            return
        w.refresh_token = stored.refresh_token
        if stored.grant is None:
            return
        grant, now = stored.grant, self._clock()
        if grant.expires_at - now <= self.policy.min_margin:
            log.info("token.not_restored", credential=w.cred.name, reason="expires soon")
            return
        entry = self.store.upsert(w.cred.name, w.cred.path)
        entry.grant, entry.last_refresh = grant, grant.issued_at
        w.next_at = max(now, next_refresh_at(grant, self.policy, self._rand()))
        w.write_pending = True
        log.debug("token.restored", credential=w.cred.name, expires_at=rfc3339(grant.expires_at))
        self._restored += 1

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

    async def _write_state(self, state: StateFile) -> None:
        entries: dict[str, Stored] = {}
        for e in self.store:
            w = self._workers.get(e.name)
            chain = w.refresh_token if w is not None else None
            if e.credential is not None and (e.grant is not None or chain is not None):
                entries[e.name] = Stored(e.credential.identity, e.grant, chain)
        try:
            await anyio.to_thread.run_sync(lambda: state.save(entries))
        except OSError as e:
            log.error("state.save_failed", path=str(state.path), error=str(e))

    async def _watch_clock(self) -> None:
        """Wake every worker when the wall clock jumps (workers sleep on monotonic time)."""
        watch = ClockWatch(self._clock(), time.monotonic())
        while True:
            await anyio.sleep(self.policy.recheck_interval)
            drift = watch.jumped(self._clock(), time.monotonic())
            if drift is not None:
                log.info("clock.jumped", seconds=round(drift, 1), workers=len(self._workers))
                for w in self._workers.values():
                    w.wake.set()

    # -- forced refresh ----------------------------------------------------------------------

    async def refresh(self, name: str) -> Entry:
        """Fetch a new token for *name* now (single-flight) and return its entry afterwards.
        Raises KeyError for an unknown or never-valid credential."""
        worker = self._workers.get(name)
        if worker is None:
            raise KeyError(name)
        await self._fetch(worker)
        worker.wake.set()  # its sleep was computed before: a new due time, a pending write
        entry = self.store.get(name)
        if entry is None:
            raise KeyError(name)
        return entry

    def forced_refresh_at(self, name: str, min_interval: float) -> float | None:
        """When a forced refresh of *name* may next reach IMS: *min_interval* after the last
        attempt or success, whatever its outcome, and not before the retry that the backoff
        (or a ``Retry-After``) set for a failing credential. None while an attempt is in
        flight: joining it costs IMS nothing. Raises KeyError for an unknown credential."""
        w = self._workers[name]
        if w.flight is not None:
            return None
        entry = self.store.get(name)
        last = max(w.attempted_at, (entry.last_refresh if entry else None) or -math.inf)
        at = last + min_interval
        if w.last_kind is not None:
            at = max(at, w.next_at)
        return at

    # -- the worker loop ---------------------------------------------------------------------

    async def _loop(self, w: _Worker) -> None:
        with w.scope:
            while True:
                now = self._clock()
                if now >= w.next_at:
                    await self._fetch(w)
                    w.done.set()
                elif w.write_pending:
                    await self._publish(w)
                    w.done.set()  # a token restored from the state dir counts as the first
                wake_at = w.next_at
                if w.write_pending:
                    wake_at = min(wake_at, self._write_retry_at(w))
                with anyio.move_on_after(sleep_for(self._clock(), wake_at)):
                    await w.wake.wait()
                if w.wake.is_set():
                    w.wake = anyio.Event()

    def _write_retry_at(self, w: _Worker) -> float:
        if w.write_attempt == 0:
            return 0.0
        entry = self.store.get(w.cred.name)
        expires = entry.grant.expires_at if entry is not None and entry.grant else math.inf
        return write_retry_at(self._clock(), w.write_attempt, self.policy, self._rand(), expires)

    async def _fetch(self, w: _Worker) -> None:
        if w.flight is not None:  # single-flight: share the attempt in progress
            await w.flight.wait()
            return
        w.flight = anyio.Event()
        try:
            await self._attempt(w)
        finally:
            w.flight.set()
            w.flight, w.flow = None, None

    async def _attempt(self, w: _Worker) -> None:
        cred = w.cred
        entry = self.store.upsert(cred.name, cred.path)
        started = w.attempted_at = self._clock()
        try:
            try:
                flow = flow_for(cred, self.auth_methods, now=started, refresh_token=w.refresh_token)
            except CredentialError as e:  # the method's plugin is gone (a reload)
                raise ImsError(ImsErrorKind.PERMANENT, "unsupported_auth", e.reason) from None
            w.flow = flow
            grant = await self.client.run(flow)
        except ImsError as e:
            entry.consecutive_failures += 1
            entry.last_error = str(e)
            w.last_kind = e.kind
            if self._observer is not None:
                self._observer.refreshed(cred.name, e.kind.value, self._clock() - started)
            expires = entry.grant.expires_at if entry.grant else None
            w.next_at = retry_at(
                self._clock(), e, entry.consecutive_failures, self.policy, self._rand(), expires
            )
            level = log.error if e.kind is ImsErrorKind.PERMANENT else log.warning
            level(
                "token.refresh_failed",
                credential=cred.name,
                error=str(e),
                kind=e.kind.value,
                failures=entry.consecutive_failures,
                state=entry.state(self._clock()).value,
                retry_in=round(max(0.0, w.next_at - self._clock()), 1),
            )
            await self._announce_failure(cred.name, str(e))
            return
        entry.grant = grant
        if grant.refresh_token is not None:
            w.refresh_token = grant.refresh_token  # persisted below, before publishing
        if self._observer is not None:
            self._observer.refreshed(cred.name, "success", self._clock() - started)
        w.last_kind = None
        entry.consecutive_failures = 0
        entry.last_error = None
        entry.last_refresh = self._clock()
        w.next_at = next_refresh_at(grant, self.policy, self._rand())
        log.info(
            "token.refreshed",
            credential=cred.name,
            expires_at=rfc3339(grant.expires_at),
            next_refresh_in=round(max(0.0, w.next_at - self._clock()), 1),
            duration_ms=round((self._clock() - started) * 1000, 1),
        )
        w.write_pending = True
        w.write_attempt = 0
        if grant.refresh_token is not None:
            await self._save_state()  # the rotated refresh token is durable before publishing
        else:
            self._dirty.set()
        await self._publish(w)

    async def _publish(self, w: _Worker) -> None:
        """Write the current grant's files; on failure keep ``write_pending`` for a retry."""
        entry = self.store.get(w.cred.name)
        if entry is None or entry.grant is None:
            w.write_pending = False
            return
        try:
            files, left_out = render_safe(w.cred, entry.grant, self.products)
            if self.sink.in_memory():  # no device to wait for: cheaper than a thread hop
                self.sink.write(w.cred.name, files)
            else:
                await anyio.to_thread.run_sync(self.sink.write, w.cred.name, files)
        except (RenderError, SinkError, OSError) as e:
            w.write_attempt += 1
            entry.last_error = f"writing outputs: {e}"
            log.error(
                "sink.write_failed", credential=w.cred.name, error=str(e), attempt=w.write_attempt
            )
            await self._announce_failure(w.cred.name, entry.last_error)
            return
        w.write_pending = False
        w.write_attempt = 0
        if entry.last_error and entry.last_error.startswith("writing outputs"):
            entry.last_error = None
        log.debug("sink.written", credential=w.cred.name, files=sorted(files))
        entry.outputs_incomplete = bool(left_out)
        if left_out:  # the same inputs render the same: no retry until the token or file changes
            entry.last_error = f"writing outputs: {'; '.join(map(str, left_out))}"
            log.error("sink.outputs_incomplete", credential=w.cred.name, error=entry.last_error)
            await self._announce_failure(w.cred.name, entry.last_error)
        if w.announced is not entry.grant:
            w.announced = entry.grant
            if w.cred.on_refresh is not None and self._tg is not None:
                self._tg.start_soon(self._on_refresh, w, name=f"imsd-on-refresh-{w.cred.name}")
            await self._call_plugins(
                "imsd_token_refreshed",
                credential=w.cred.name,
                expires_at=entry.grant.expires_at,
                output_dir=str(Path(self._output_dir) / w.cred.name),
            )

    async def _on_refresh(self, w: _Worker) -> None:
        """The credential's ``on_refresh`` action, off the worker's path (a slow command
        never delays a refresh) and one at a time per credential."""
        async with w.action_lock:
            action = w.cred.on_refresh
            if action is not None:
                await run_action(
                    action,
                    credential=w.cred.name,
                    output_dir=Path(self._output_dir) / w.cred.name,
                )

    async def _announce_failure(self, name: str, error: str) -> None:
        entry = self.store.get(name)
        state = entry.state(self._clock()).value if entry else "invalid"
        await self._call_plugins(
            "imsd_credential_failed", credential=name, error=error, state=state
        )

    async def _call_plugins(self, hook: str, **kwargs: Any) -> None:
        if self._notify_wants is not None and not self._notify_wants(hook):
            return  # nobody implements it: no thread hop per refresh
        if self._notify is not None:
            notify = self._notify
            await anyio.to_thread.run_sync(lambda: notify(hook, **kwargs))

    def stuck(self, now: float, grace: float) -> list[str]:
        """Credentials whose refresh is overdue by more than *grace* with nothing in flight,
        or whose IMS exchange has outlived the client's deadline by more than *grace*: the
        watchdog stops pinging systemd when the scheduler stops making progress."""
        overran = getattr(self.client, "overran", None)  # ImsClient's; test doubles lack it
        return [
            name
            for name, w in self._workers.items()
            if (w.flight is None and w.next_at and now > w.next_at + grace)
            or (w.flow is not None and overran is not None and overran(w.flow, grace))
        ]

    def write_pending(self, name: str) -> bool:
        worker = self._workers.get(name)
        return worker is not None and worker.write_pending

    def last_error_kind(self, name: str) -> ImsErrorKind | None:
        worker = self._workers.get(name)
        return None if worker is None else worker.last_kind

    def next_refresh(self, name: str) -> float | None:
        worker = self._workers.get(name)
        return None if worker is None or math.isinf(worker.next_at) else worker.next_at
