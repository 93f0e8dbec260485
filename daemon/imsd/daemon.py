"""Wiring: settings → IMS client, file sink, supervisor and directory watcher under one task
group. Shutdown is cancellation of that group, after the listeners have drained
(:meth:`Daemon.stop`); nothing outlives it."""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.abc
import structlog

from imsd import logs, sdnotify, tcppeer
from imsd.api import Api, HealthApi
from imsd.catalog import Added, Catalog, Changed, Event, Failed, ScanResult
from imsd.config import RELOAD, ConfigError, Reload, Settings
from imsd.credentials import parse_credentials, resolve_roots
from imsd.exchange import ImsClient
from imsd.httpserver import HttpServer, bound_port, tcp_listener, unix_listener
from imsd.metrics import Metrics
from imsd.model import Credential, ImsErrorKind
from imsd.persist import StateFile
from imsd.plugin import AuthMethod
from imsd.proxy import Access, Proxy
from imsd.registry import Registry
from imsd.sinks import FileSink, make_dirs
from imsd.store import TokenStore
from imsd.supervisor import Supervisor
from imsd.watcher import DirectoryWatcher, scan_directory

__all__ = ["Daemon", "credential_parser", "raise_nofile_limit", "run_once"]

log = structlog.get_logger("imsd.daemon")

#: Descriptors kept out of the listeners' reach: IMS connections, file writes, the watcher,
#: the state file, actions. Connection caps are lowered so that attackers can never take them.
FD_RESERVE: Final = 256
_LISTENERS: Final = 2  # the socket API and the metrics listener: one descriptor a connection
_PROXY_DESCRIPTORS: Final = 2  # a proxy connection holds its client's and its upstream's
#: How long requests in flight at SIGTERM/SIGINT may take to finish: well below the unit's
#: TimeoutStopSec=15s, after which systemd kills the daemon.
STOP_GRACE: Final = 5.0


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit in effect.

    A seccomp filter (the unit's ``~@resources``) may forbid it: then the limit is what the
    service manager set (``LimitNOFILE=``)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft and (hard == resource.RLIM_INFINITY or hard > soft):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_cap(configured: int, nofile: int, proxies: int = 0) -> int:
    """Connections per listener that the descriptor limit can hold beside the reserve, every
    listener full at once: the socket API's and the metrics', and *proxies* proxy listeners
    at two descriptors a connection (the upstream pool never holds more connections than
    its listener has clients: a new one is opened only when none is idle)."""
    weight = _LISTENERS + _PROXY_DESCRIPTORS * proxies
    return max(8, min(configured, (nofile - FD_RESERVE) // weight))


def credential_parser(
    settings: Settings,
    env: Mapping[str, str] | None = None,
    auth_methods: Mapping[str, AuthMethod] | None = None,
) -> Callable[[Path, bytes], list[Credential]]:
    env = dict(os.environ if env is None else env)
    creds_dir = env.get("CREDENTIALS_DIRECTORY")
    return functools.partial(
        parse_credentials,
        default_ims_url=settings.ims_url,
        env=env,
        credentials_directory=Path(creds_dir) if creds_dir else None,
        secret_roots=resolve_roots(settings.secret_root_paths(env)),
        auth_methods=auth_methods,
    )


def _client(settings: Settings, metrics: Metrics | None = None) -> ImsClient:
    return ImsClient(
        max_concurrent=settings.max_concurrent_requests,
        rate=settings.request_rate,
        burst=settings.request_burst,
        timeout=settings.request_timeout,
        on_response=metrics.ims_response if metrics is not None else None,
    )


def _fleet(
    settings: Settings, env: Mapping[str, str], metrics: Metrics, clock: Callable[[], float]
) -> Any:
    """Fleet mode's Redis driver, or None: without ``coordination`` no Redis client is
    even imported."""
    if not settings.coordination:
        return None
    from imsd.fleetredis import Fleet, read_password

    return Fleet(
        settings.coordination,
        prefix=settings.coordination_prefix,
        password=read_password(
            settings.coordination_password_file, settings.coordination_password_env, env
        ),
        lease=settings.coordination_lease,
        clock=clock,
        observer=metrics,
    )


def _sink(settings: Settings) -> FileSink:
    return FileSink(
        settings.output_dir, file_mode=settings.file_mode, file_group=settings.file_gid()
    )


class Daemon:
    """``imsd run``: watch, refresh, write and serve until cancelled or signalled.

    *reload* re-reads the settings on SIGHUP; a failing reload keeps the running settings.
    """

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        *,
        reload: Callable[[], Settings] | None = None,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self.registry = registry
        self._reload = reload
        self._env = os.environ if env is None else env
        self.store = TokenStore()
        self.metrics = Metrics(self.store, clock=clock)
        self.supervisor: Supervisor | None = None
        self.fleet: Any = None  # imsd.fleetredis.Fleet in fleet mode (imported only then)
        self.watcher: DirectoryWatcher | None = None
        self._api_scope: anyio.CancelScope | None = None
        self._health_scope: anyio.CancelScope | None = None
        self._api: Api | None = None
        self._servers: dict[str, HttpServer] = {}
        self._nofile = 1 << 20
        self._reload_requested = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self._stopping = False
        self.socket_address: Path | None = None
        self.metrics_port: int | None = None
        self.proxies: list[tuple[Proxy, str]] = []  # with the bound address

    async def run(
        self,
        *,
        handle_signals: bool = True,
        on_ready: Callable[[Daemon], Awaitable[None]] | None = None,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        s = self.settings
        self._nofile = raise_nofile_limit()
        if self._cap(s) < s.max_connections:
            log.warning(
                "daemon.connection_cap_lowered",
                max_connections=self._cap(s),
                configured=s.max_connections,
                nofile=self._nofile,
                hint="raise LimitNOFILE= (or ulimit -n) to keep the configured cap",
            )
        sink = _sink(s)
        try:
            async with _client(s, self.metrics) as client, anyio.create_task_group() as tg:
                self._tg = tg
                fleet = self.fleet = _fleet(s, self._env, self.metrics, self._clock)
                sup = self.supervisor = Supervisor(
                    client=client,
                    sink=sink,
                    products=self.registry.products,
                    auth_methods=self.registry.auth_methods,
                    policy=s.refresh_policy(),
                    store=self.store,
                    notify=self.registry.notify,
                    notify_wants=self.registry.implemented,
                    observer=self.metrics,
                    output_dir=str(s.output_dir),
                    clock=self._clock,
                    state=StateFile(s.state_dir),
                    fleet=fleet,
                )
                await tg.start(sup.run)
                if fleet is not None:
                    await tg.start(fleet.run, sup)
                if handle_signals:
                    tg.start_soon(self._signals, tg)
                tg.start_soon(self._reloader)
                watcher = self.watcher = DirectoryWatcher(
                    s.credentials_dir,
                    parse=credential_parser(s, self._env, self.registry.auth_methods),
                    on_events=sup.apply,
                    debounce_ms=s.debounce_ms,
                    rescan_interval=s.rescan_interval,
                )
                # Orphans are cleaned before any worker writes, so cleanup never races a write;
                # the same scan is the watcher's initial state (parsed once).
                # Abandoned if cancelled: a read stuck in the kernel must not block shutdown.
                scan = await anyio.to_thread.run_sync(watcher.scan, abandon_on_cancel=True)
                if scan is not None:
                    await anyio.to_thread.run_sync(sink.cleanup_orphans, _current_names(scan))
                await tg.start(watcher.run, scan)
                await self._bind_api(tg, s, activation=True)
                await self._bind_health(tg, s)
                await self._bind_proxies(tg, s)
                await sup.wait_first_attempts()
                log.info(
                    "daemon.ready",
                    credentials=len(sup.store),
                    credentials_dir=str(s.credentials_dir),
                    output_dir=str(s.output_dir),
                    socket=str(self.socket_address),
                    metrics_port=self.metrics_port,
                )
                sdnotify.notify("READY=1", f"STATUS={self.status_line()}", env=self._env)
                tg.start_soon(self._watchdog)
                task_status.started()
                if on_ready is not None:
                    await on_ready(self)
        finally:
            self._tg = None
            sdnotify.notify("STOPPING=1", env=self._env)
            self._unlink_socket()
            _unlink_proxies(s)

    # -- listeners ---------------------------------------------------------------------------

    async def _bind_proxies(self, tg: anyio.abc.TaskGroup, s: Settings) -> None:
        """The ``[[proxy]]`` listeners (README "Proxy"), bound once at start."""
        assert self.supervisor is not None
        for spec in s.proxy:
            listener: anyio.abc.Listener[Any]
            if spec.tcp and spec.checks_peers and (why := tcppeer.available()) is not None:
                raise ConfigError(
                    f"proxy {spec.listen}: peer_check cannot find who connects: {why}; "
                    "set peer_check = false in its [[proxy]] table to let every local user "
                    "use it"
                )
            if spec.tcp:
                listener = await tcp_listener(spec.host, spec.port)
                address = f"{spec.host}:{bound_port(listener)}"
                if spec.allow_remote:
                    log.warning(
                        "proxy.listening_remote",
                        address=address,
                        credential=spec.credential,
                        product=spec.product,
                        hint="anyone who can reach this address uses the credential",
                    )
            else:
                listener = await unix_listener(
                    Path(spec.listen), mode=s.socket_mode, gid=s.socket_gid()
                )
                address = spec.listen
            proxy = Proxy(
                spec,
                self.supervisor,
                self.registry.products,
                access=self._proxy_access,
                metrics=self.metrics,
                max_connections=self._cap(s),
                clock=self._clock,
            )
            await tg.start(proxy.serve, listener)
            self.proxies.append((proxy, address))
            log.info(
                "proxy.listening", address=address, credential=spec.credential, product=spec.product
            )

    def _cap(self, s: Settings) -> int:
        """Each listener's connection cap under the descriptor limit (proxies bound at start:
        their number never changes with a reload)."""
        return connection_cap(s.max_connections, self._nofile, len(s.proxy))

    def _proxy_access(self) -> Access:
        api = self._api
        assert api is not None
        return Access(api.allowed_uids, api.allowed_gids, api.min_refresh_interval)

    async def _bind_api(self, tg: anyio.abc.TaskGroup, s: Settings, *, activation: bool) -> None:
        if self._api_scope is not None:
            self._api_scope.cancel()
            self._unlink_socket()
        assert self.supervisor is not None
        api = self._api = Api(
            self.supervisor,
            self.registry.products,
            metrics=self.metrics,
            allowed_uids=s.allowed_uids,
            allowed_gids=s.allowed_gids,
            min_refresh_interval=s.min_refresh_interval,
            clock=self._clock,
        )
        inherited = sdnotify.listen_fds(self._env) if activation else []
        if inherited:
            listener: anyio.abc.Listener[Any] = await anyio.abc.SocketListener.from_socket(
                inherited[0]
            )
            self.socket_address = None  # systemd owns the file
            log.info("api.socket_activated")
        else:
            make_dirs(s.socket.parent, 0o750)  # exactly 0750, parents too, whatever the umask
            listener = await unix_listener(s.socket, mode=s.socket_mode, gid=s.socket_gid())
            self.socket_address = s.socket
        server = self._server("socket", api.handle, s)
        self._api_scope = await tg.start(self._serve, server, listener)

    async def _bind_health(self, tg: anyio.abc.TaskGroup, s: Settings) -> None:
        if self._health_scope is not None:
            self._health_scope.cancel()
            self._health_scope, self.metrics_port = None, None
        if not s.metrics_address:
            return
        host, port = parse_address(s.metrics_address)
        listener = await tcp_listener(host, port)
        self.metrics_port = bound_port(listener)
        health = HealthApi(self.store, self.metrics, clock=self._clock)
        server = self._server("metrics", health.handle, s)
        self._health_scope = await tg.start(self._serve, server, listener)

    def _server(self, name: str, handler: Any, s: Settings) -> HttpServer:
        server = self._servers[name] = HttpServer(
            handler,
            name=name,
            max_connections=self._cap(s),
            observer=self.metrics,
        )
        return server

    @staticmethod
    async def _serve(
        server: HttpServer,
        listener: anyio.abc.Listener[Any],
        *,
        task_status: anyio.abc.TaskStatus[anyio.CancelScope] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        with anyio.CancelScope() as scope:
            task_status.started(scope)
            try:
                await server.serve([listener])
            finally:
                with anyio.CancelScope(shield=True):
                    await listener.aclose()

    def _unlink_socket(self) -> None:
        if self.socket_address is not None:
            with contextlib.suppress(FileNotFoundError):
                self.socket_address.unlink()
            self.socket_address = None

    # -- signals, reload, watchdog -----------------------------------------------------------

    async def _signals(self, tg: anyio.abc.TaskGroup) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for signum in sigs:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    if not self._stopping:
                        self.request_reload()
                elif not self._stopping:
                    log.info("daemon.stopping", signal=name, grace=STOP_GRACE)
                    tg.start_soon(self.stop)
                else:  # a second stop signal: the operator will not wait for the drain
                    log.info("daemon.stopping_now", signal=name)
                    tg.cancel_scope.cancel()
                    return

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop as SIGTERM/SIGINT do: the listeners stop accepting at once, requests already
        begun finish (answered with ``Connection: close``) for at most *grace* seconds, then
        everything is cancelled and :meth:`run` returns."""
        tg = self._tg
        if tg is None or self._stopping:
            return
        self._stopping = True
        async with anyio.create_task_group() as drain:
            for server in self._servers.values():
                drain.start_soon(server.shutdown, grace)
        tg.cancel_scope.cancel()

    def request_reload(self) -> None:
        """Ask for a reload; requests arriving during one coalesce into one more."""
        self._reload_requested.set()

    async def _reloader(self) -> None:
        while True:
            await self._reload_requested.wait()
            self._reload_requested = anyio.Event()
            await self.reload()

    async def reload(self) -> None:
        sdnotify.notify(
            "RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}", env=self._env
        )
        try:
            await self._apply_reload()
        finally:
            sdnotify.notify("READY=1", f"STATUS={self.status_line()}", env=self._env)

    async def _apply_reload(self) -> None:
        old = self.settings
        if self._reload is not None:
            try:
                new = self._reload()
            except ConfigError as e:
                log.error("daemon.reload_failed", error=str(e), kept="previous configuration")
                return
        else:
            new = old
        fixed = [
            f
            for f, how in RELOAD.items()
            if how is Reload.RESTART and getattr(new, f) != getattr(old, f)
        ]
        if fixed:
            log.warning(
                "daemon.reload_needs_restart",
                settings=fixed,
                kept="the running values of these settings until a restart",
            )
            new = new.model_copy(update={f: getattr(old, f) for f in fixed})
        self.settings = new
        if new.log_level != old.log_level:
            logs.set_level(new.log_level)
        sup = self.supervisor
        if sup is not None:
            sup.policy = new.refresh_policy()
        if self._api is not None:
            self._api.set_access(
                allowed_uids=new.allowed_uids,
                allowed_gids=new.allowed_gids,
                min_refresh_interval=new.min_refresh_interval,
            )
        for server in self._servers.values():
            server.max_connections = self._cap(new)
        for proxy, _ in self.proxies:
            proxy.slots.max_connections = self._cap(new)
        tg = self._tg
        if tg is not None:
            if _api_changed(old, new):
                await self._bind_api(tg, new, activation=False)
            if new.metrics_address != old.metrics_address:
                await self._bind_health(tg, new)
        if self.watcher is not None:  # every file again, with the new default IMS host
            self.watcher.parse = credential_parser(new, self._env, self.registry.auth_methods)
            await self.watcher.rescan(full=True)
        log.info(
            "daemon.reloaded",
            rebound_api=_api_changed(old, new),
            rebound_metrics=new.metrics_address != old.metrics_address,
        )

    def status_line(self) -> str:
        counts = self.store.counts(time.time())
        parts = [f"{n} {state.value}" for state, n in counts.items() if n]
        return f"{len(self.store)} credentials" + (": " + ", ".join(parts) if parts else "")

    async def _watchdog(self) -> None:
        interval = sdnotify.watchdog_interval(self._env)
        last_status = ""
        while True:
            await anyio.sleep(interval or 5.0)
            status = self.status_line()
            fields = []
            if status != last_status:
                fields.append(f"STATUS={status}")
                last_status = status
            sup = self.supervisor
            if interval and sup is not None and not sup.stuck(time.time(), grace=60.0):
                fields.append("WATCHDOG=1")  # only while the scheduler makes progress
            if fields:
                sdnotify.notify(*fields, env=self._env)


def _api_changed(old: Settings, new: Settings) -> bool:
    return (old.socket, old.socket_mode, old.socket_group) != (
        new.socket,
        new.socket_mode,
        new.socket_group,
    )


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[v6]:PORT`` → (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"metrics_address: expected HOST:PORT, got {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _unlink_proxies(s: Settings) -> None:
    for spec in s.proxy:
        if not spec.tcp:
            with contextlib.suppress(OSError):
                os.unlink(spec.listen)


def _current_names(scan: Mapping[Path, ScanResult]) -> set[str]:
    """Credential names a scan knows about: their output dirs are not orphans."""
    names = {c.name for result in scan.values() if isinstance(result, list) for c in result}
    # A broken file keeps its token files (its last good version may come back).
    names |= {p.stem for p, result in scan.items() if not isinstance(result, list)}
    return names


def _initial_events(settings: Settings, registry: Registry) -> list[Event]:
    parse = credential_parser(settings, auth_methods=registry.auth_methods)
    scan = scan_directory(settings.credentials_dir, parse=parse)
    return [] if scan is None else Catalog().apply(scan)


def check(settings: Settings, registry: Registry) -> list[str]:
    """``imsd check``: every problem with the credential files, no network. Empty = valid."""
    from imsd.model import CredentialError
    from imsd.registry import validate_products

    problems: list[str] = []
    if not settings.credentials_dir.is_dir():
        return [f"{settings.credentials_dir}: credentials directory not found"]
    for event in _initial_events(settings, registry):
        if isinstance(event, Failed):
            problems.append(str(event.error))
        elif isinstance(event, Added | Changed):
            cred = event.cred if isinstance(event, Added) else event.new
            try:
                validate_products(cred, registry.products)
            except CredentialError as e:
                problems.append(str(e))
    return problems


async def run_once(
    settings: Settings,
    registry: Registry,
    *,
    give_up_after: float = 60.0,
    allow_empty: bool = False,
) -> int:
    """``imsd once``: fetch and write every credential, retrying transient failures until
    *give_up_after* seconds. Returns the exit code: 0 when every credential was written, else
    1 — also when there was none to write unless *allow_empty* (an init container whose
    credentials mount is wrong must fail, not start its app without tokens)."""
    events = _initial_events(settings, registry)  # invalid files: logged by the supervisor
    if not events:
        (log.info if allow_empty else log.error)(
            "once.empty",
            credentials_dir=str(settings.credentials_dir),
            hint="no credential files found; wrong directory? (--allow-empty accepts this)",
        )
        return 0 if allow_empty else 1
    sink = _sink(settings)
    async with _client(settings) as client, anyio.create_task_group() as tg:
        sup = Supervisor(
            client=client,
            sink=sink,
            products=registry.products,
            auth_methods=registry.auth_methods,
            policy=settings.refresh_policy(),
            state=StateFile(settings.state_dir),
            notify=registry.notify,
            notify_wants=registry.implemented,
            output_dir=str(settings.output_dir),
            retry_until=time.time() + give_up_after,
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
    invalid = {n for n in outcomes if (e := sup.store.get(n)) is not None and e.file_error}
    failed = sorted(n for n, o in outcomes.items() if o != "ok" and n not in invalid)
    for name in failed:  # an invalid file was logged once already, as credential.invalid
        entry = sup.store.get(name)
        log.error("once.failed", credential=name, error=entry.error() if entry else None)
    log.info(
        "once.done",
        written=len(outcomes) - len(failed) - len(invalid),
        failed=len(failed),
        invalid_files=len(invalid),
    )
    return 1 if failed or invalid else 0


def _outcome(sup: Supervisor, name: str) -> str:
    entry = sup.store.get(name)
    if entry is None or entry.credential is None or entry.file_error:
        return "failed"
    if entry.grant is not None and not entry.write_pending:
        return "failed" if entry.outputs_incomplete else "ok"
    if entry.error_kind is ImsErrorKind.PERMANENT:
        return "failed"
    return "pending"
