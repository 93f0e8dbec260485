"""Wiring: settings → IMS client, file sink, supervisor and directory watcher under one task
group. Shutdown is cancellation of that group; nothing outlives it."""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import anyio
import anyio.abc
import structlog

from imsd.catalog import Added, Catalog, Changed, Event, Failed
from imsd.config import Settings
from imsd.credentials import parse_credential
from imsd.imsclient import ImsClient
from imsd.model import Credential, ImsErrorKind
from imsd.registry import Registry
from imsd.sinks import FileSink
from imsd.supervisor import Supervisor
from imsd.watcher import DirectoryWatcher, scan_directory

__all__ = ["Daemon", "credential_parser", "run_once"]

log = structlog.get_logger("imsd.daemon")


def credential_parser(
    settings: Settings, env: Mapping[str, str] | None = None
) -> Callable[[Path, bytes], Credential]:
    env = dict(os.environ if env is None else env)
    creds_dir = env.get("CREDENTIALS_DIRECTORY")
    return functools.partial(
        parse_credential,
        default_ims_url=settings.ims_url,
        env=env,
        credentials_directory=Path(creds_dir) if creds_dir else None,
    )


def _client(settings: Settings) -> ImsClient:
    return ImsClient(
        max_concurrent=settings.max_concurrent_requests,
        rate=settings.request_rate,
        burst=settings.request_burst,
        timeout=settings.request_timeout,
    )


def _sink(settings: Settings) -> FileSink:
    return FileSink(
        settings.output_dir, file_mode=settings.file_mode, file_group=settings.file_gid()
    )


class Daemon:
    """``imsd run``: watch, refresh and write until cancelled or signalled."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self.supervisor: Supervisor | None = None
        self.watcher: DirectoryWatcher | None = None

    async def run(
        self,
        *,
        handle_signals: bool = True,
        on_ready: Callable[[Daemon], Awaitable[None]] | None = None,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        s = self.settings
        sink = _sink(s)
        async with _client(s) as client, anyio.create_task_group() as tg:
            sup = self.supervisor = Supervisor(
                client=client,
                sink=sink,
                products=self.registry.products,
                policy=s.refresh_policy(),
                notify=self.registry.notify,
                output_dir=str(s.output_dir),
            )
            await tg.start(sup.run)
            if handle_signals:
                tg.start_soon(self._signals, tg.cancel_scope)
            watcher = self.watcher = DirectoryWatcher(
                s.credentials_dir,
                parse=credential_parser(s),
                on_events=sup.apply,
                debounce_ms=s.debounce_ms,
                rescan_interval=s.rescan_interval,
            )
            await tg.start(watcher.run)
            keep = {e.name for e in sup.store}
            await anyio.to_thread.run_sync(sink.cleanup_orphans, keep)
            await sup.wait_first_attempts()
            log.info(
                "daemon.ready",
                credentials=len(sup.store),
                credentials_dir=str(s.credentials_dir),
                output_dir=str(s.output_dir),
            )
            task_status.started()
            if on_ready is not None:
                await on_ready(self)

    async def _signals(self, scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for signum in sigs:
                if signum == signal.SIGHUP:
                    log.info("daemon.rescan", reason="SIGHUP")
                    if self.watcher is not None:
                        await self.watcher.rescan()
                    continue
                log.info("daemon.stopping", signal=signal.Signals(signum).name)
                scope.cancel()
                return


def _initial_events(settings: Settings) -> list[Event]:
    scan = scan_directory(settings.credentials_dir, parse=credential_parser(settings))
    return Catalog().apply(scan)


def check(settings: Settings, registry: Registry) -> list[str]:
    """``imsd check``: every problem with the credential files, no network. Empty = valid."""
    from imsd.model import CredentialError
    from imsd.registry import validate_products

    problems: list[str] = []
    if not settings.credentials_dir.is_dir():
        return [f"{settings.credentials_dir}: credentials directory not found"]
    for event in _initial_events(settings):
        if isinstance(event, Failed):
            problems.append(str(event.error))
        elif isinstance(event, Added | Changed):
            cred = event.cred if isinstance(event, Added) else event.new
            try:
                validate_products(cred, registry.products)
            except CredentialError as e:
                problems.append(str(e))
    return problems


async def run_once(settings: Settings, registry: Registry, *, give_up_after: float = 60.0) -> int:
    """``imsd once``: fetch and write every credential, retrying transient failures until
    *give_up_after* seconds. Returns the exit code: 0 when every credential was written, else 1."""
    events = _initial_events(settings)
    invalid = [e for e in events if isinstance(e, Failed)]
    for event in invalid:
        log.error("credential.invalid", path=str(event.path), error=str(event.error))
    sink = _sink(settings)
    async with _client(settings) as client, anyio.create_task_group() as tg:
        sup = Supervisor(
            client=client, sink=sink, products=registry.products, policy=settings.refresh_policy()
        )
        await tg.start(sup.run)
        await sup.apply(events)
        with anyio.move_on_after(give_up_after):
            while True:
                await sup.wait_first_attempts()
                outcomes = {e.name: _outcome(sup, e.name) for e in sup.store}
                if all(o != "pending" for o in outcomes.values()):
                    break
                await anyio.sleep(0.05)
        outcomes = {e.name: _outcome(sup, e.name) for e in sup.store}
        tg.cancel_scope.cancel()
    failed = sorted(n for n, o in outcomes.items() if o != "ok")
    for name in failed:
        entry = sup.store.get(name)
        log.error("once.failed", credential=name, error=entry.error() if entry else None)
    log.info(
        "once.done",
        written=len(outcomes) - len(failed),
        failed=len(failed),
        invalid_files=len(invalid),
    )
    return 1 if failed or invalid else 0


def _outcome(sup: Supervisor, name: str) -> str:
    entry = sup.store.get(name)
    if entry is None or entry.credential is None or entry.file_error:
        return "failed"
    if entry.grant is not None and not sup.write_pending(name):
        return "ok"
    if sup.last_error_kind(name) is ImsErrorKind.PERMANENT:
        return "failed"
    return "pending"
