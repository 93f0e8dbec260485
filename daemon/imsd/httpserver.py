"""A small HTTP/1.1 server: h11 for the protocol, anyio listeners for the I/O.

Theory of operation
-------------------
Each accepted connection runs in its own task: read one request under a deadline (idle
keep-alive clients and slow-loris senders time out and never hold anything but their own
task), call the handler, write the response under a deadline too (a client that never reads
its answer is dropped, its buffers with it), and loop while keep-alive allows. Protocol
errors get their status (400 malformed, 413 body too large, 431 headers too large) with a
JSON body and ``Connection: close``; a handler exception becomes a 500 and is logged without
the request body. On cancellation every connection task unwinds. :meth:`HttpServer.shutdown`
drains instead: it closes the listeners (newcomers are refused, not left in the backlog) and
the keep-alive connections waiting for their next request, and lets requests already begun
finish within a grace period, answered with ``Connection: close``.

Hostile clients must never end the daemon or starve its refreshes of file descriptors. Each
server holds at most ``max_connections``; a newcomer beyond that sheds the connection that
has been idle (waiting for its next request, or for its peer to read) the longest, and is
itself closed when every connection is busy in a handler. An ``accept()`` failure (EMFILE,
ENFILE, ENOBUFS…) is logged (at most once per ``_ACCEPT_LOG_EVERY`` seconds), sheds the
oldest idle connection to free a descriptor, and retries after a short growing pause: it
never escapes the listener's task.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol
from urllib.parse import parse_qs, urlsplit

import anyio
import anyio.abc
import h11
import structlog
from anyio.abc import SocketAttribute

from imsd.slots import SlotTable

__all__ = [
    "IDLE_TIMEOUT",
    "SEND_SLICE",
    "AbortConnection",
    "ConnectionObserver",
    "Handler",
    "HttpServer",
    "PeerCred",
    "Request",
    "Response",
    "Slots",
    "StreamWrapper",
    "bound_port",
    "peer_cred",
    "tcp_listener",
    "unix_listener",
]

log = structlog.get_logger("imsd.httpserver")

_REASONS: Final = {400: "bad_request", 413: "payload_too_large", 431: "headers_too_large"}
_ACCEPT_LOG_EVERY: Final = 10.0  # seconds between two log lines about failing accept()
_ACCEPT_PAUSE_MAX: Final = 1.0  # longest pause after a failed accept()
#: A request must arrive, and an answer (each write of it) be taken, within this (seconds).
IDLE_TIMEOUT: Final = 10.0


class ConnectionObserver(Protocol):
    """Where a server reports what it does to connections (:class:`imsd.metrics.Metrics`)."""

    def connection_event(self, listener: str, event: str) -> None:
        """*event* is ``shed`` (an idle connection closed for a newcomer), ``refused`` (a
        newcomer closed, every connection busy) or ``accept_error``."""


@dataclass(frozen=True, slots=True)
class PeerCred:
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()  # supplementary groups, as the peer had them at connect()


@dataclass(slots=True)
class Request:
    method: str
    target: str
    path: str
    query: dict[str, list[str]]
    headers: list[tuple[str, str]]  # names lower-cased
    body: bytes
    peer: PeerCred | None

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)

    def __repr__(self) -> str:
        return f"Request({self.method} {self.path})"


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    #: Awaited with each slice's size before it is sent (a byte rate shared by answers).
    pace: Callable[[int], Awaitable[None]] | None = None

    @classmethod
    def json(
        cls, obj: Any, status: int = 200, headers: Sequence[tuple[str, str]] | None = None
    ) -> Response:
        body = (json.dumps(obj, indent=1) + "\n").encode()
        return cls(status, body, [("Content-Type", "application/json"), *(headers or ())])

    @classmethod
    def text(
        cls, text: str, status: int = 200, content_type: str = "text/plain; charset=utf-8"
    ) -> Response:
        return cls(status, text.encode(), [("Content-Type", content_type)])


Handler = Callable[[Request], Awaitable[Response]]

#: A body longer than this goes out in slices of this size, one send (and one turn of the
#: event loop) each: a 2.5 MB /metrics answer written at once held the loop for the whole
#: copy, and four scrapers back to back moved token reads' p99 from 4 to 50 ms.
SEND_SLICE: Final = 64 * 1024


class AbortConnection(Exception):
    """Raised by a handler to drop the connection without any answer (fault injection)."""


class _Reject(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# Linux's SO_PEERGROUPS (4.13+); Python's socket module does not name it.
_SO_PEERGROUPS: Final = getattr(socket, "SO_PEERGROUPS", 59)


class StreamWrapper(anyio.abc.ByteStream):
    """A byte stream passed through to *inner*: a subclass overrides what it changes (the
    proxy's deadline on each write, the fake IMS's dripped answers) and nothing else."""

    def __init__(self, inner: anyio.abc.ByteStream) -> None:
        self._inner = inner

    async def send(self, item: bytes) -> None:
        await self._inner.send(item)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self._inner.receive(max_bytes)

    async def send_eof(self) -> None:
        await self._inner.send_eof()

    async def aclose(self) -> None:
        await self._inner.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self._inner.extra_attributes


def peer_cred(stream: anyio.abc.ByteStream) -> PeerCred | None:
    sock = stream.extra(SocketAttribute.raw_socket, None)
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCred(pid, uid, gid, _peer_groups(sock, pid))


def _peer_groups(sock: socket.socket, pid: int) -> tuple[int, ...]:
    """The peer's supplementary groups: from the kernel (taken at connect(), so a process
    cannot change them afterwards), else from ``/proc/PID/status`` on older kernels."""
    for size in (4 * 64, 4 * 65536):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, size)
        except OSError as e:
            if e.errno == errno.ERANGE:
                continue  # more groups than the first buffer holds
            if e.errno in (errno.ENOPROTOOPT, errno.EINVAL):
                break
            return ()
        return struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return tuple(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return ()


class Slots:
    """The connection slots of one server (the theory above), :class:`~imsd.slots.SlotTable`
    driven with anyio: each connection runs in a cancel scope, one sweeper cancels those past
    their deadline (cheaper than a deadline around every read), and a newcomer beyond
    *max_connections* sheds the connection idle the longest. :class:`HttpServer` and the
    proxy (two descriptors a connection) both hold theirs here."""

    def __init__(
        self,
        name: str,
        max_connections: int,
        observer: ConnectionObserver | None = None,
        *,
        step: float = 1.0,
    ) -> None:
        self.name = name
        self._observer = observer
        self._step = step  # the sweeper's period: deadlines are kept to within it
        self._table: SlotTable[anyio.CancelScope] = SlotTable(max_connections)
        self._arrived: anyio.Event | None = None  # wakes the sweeper
        self._accept_errors = 0  # since the last log line about them
        self._accept_logged = -math.inf

    def __len__(self) -> int:
        return len(self._table)

    @property
    def max_connections(self) -> int:
        return self._table.capacity

    @max_connections.setter
    def max_connections(self, value: int) -> None:  # a reload changes it
        self._table.capacity = value

    def idle(self, scope: anyio.CancelScope, seconds: float) -> None:
        """*scope*'s connection waits on its peer from now: cancelled unless it moves on
        within *seconds*, and sheddable meanwhile."""
        self._table.idle(scope, time.monotonic(), seconds)

    def busy(self, scope: anyio.CancelScope) -> None:
        """*scope*'s connection waits on the server's own work: neither timed out nor shed."""
        self._table.busy(scope)

    @contextlib.contextmanager
    def hold(self) -> Iterator[anyio.CancelScope]:
        """A slot for one connection, for as long as the block runs; the scope is cancelled
        when its deadline passes or it is shed (and the block then ends quietly)."""
        with anyio.CancelScope() as scope:
            self._table.add(scope)
            if self._arrived is not None:
                self._arrived.set()
            try:
                yield scope
            finally:
                self._table.remove(scope)

    async def accept_loop(
        self, listener: Any, start: Callable[[anyio.abc.ByteStream], None]
    ) -> None:
        """Accept on one socket listener and hand each newcomer to *start* (anyio's own
        ``serve`` lets an accept error end the task group, and the daemon with it)."""
        pause = 0.0
        while True:
            try:
                stream = await listener.accept()
            except anyio.ClosedResourceError:
                return
            except (OSError, anyio.BrokenResourceError) as e:
                # Out of descriptors (or kernel memory): free one of ours, wait, try again.
                # The pending connection stays in the backlog meanwhile.
                self.shed_idlest()
                self._accept_failed(e)
                pause = min(max(2 * pause, 0.01), _ACCEPT_PAUSE_MAX)
                await anyio.sleep(pause)
                continue
            pause = 0.0
            if self._table.full and not self.shed_idlest():
                self._event("refused")
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
                continue
            start(stream)

    def shed_idlest(self) -> bool:
        """Close the connection idle the longest (its slot is free at once; its task closes
        the socket); whether there was one."""
        scope = self._table.shed()
        if scope is None:
            return False
        scope.cancel()
        self._event("shed")
        return True

    def _accept_failed(self, e: BaseException) -> None:
        self._event("accept_error")
        self._accept_errors += 1
        now = time.monotonic()
        if now - self._accept_logged >= _ACCEPT_LOG_EVERY:
            cause = e.__cause__ if isinstance(e.__cause__, OSError) else e
            log.warning(
                "http.accept_failed",
                listener=self.name,
                error=os.strerror(cause.errno)
                if isinstance(cause, OSError) and cause.errno
                else type(e).__name__,
                errors=self._accept_errors,
                connections=len(self._table),
            )
            self._accept_logged, self._accept_errors = now, 0

    def _event(self, event: str) -> None:
        if self._observer is not None:
            self._observer.connection_event(self.name, event)

    async def sweep(self) -> None:
        """Cancel connections past their deadline (idle keep-alive clients, slow-loris
        senders, peers that do not read)."""
        while True:
            if not self._table:  # no connection: no wake-ups until one comes
                self._arrived = anyio.Event()
                await self._arrived.wait()
            await anyio.sleep(self._step)
            for scope in self._table.expired(time.monotonic()):
                scope.cancel()


class HttpServer:
    def __init__(
        self,
        handler: Handler,
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        max_body: int = 64 * 1024,
        max_header_bytes: int = 16 * 1024,
        max_requests_per_connection: int = 1000,
        max_connections: int = 1024,
        name: str = "http",
        observer: ConnectionObserver | None = None,
    ) -> None:
        self._handler = handler
        self.name = name
        self._slots = Slots(name, max_connections, observer, step=min(1.0, idle_timeout / 4))
        self._idle = idle_timeout
        self._max_body = max_body
        self._max_hdr = max_header_bytes
        self._max_requests = max_requests_per_connection
        self._draining = False
        self._accepting: anyio.CancelScope | None = None
        self._conns: anyio.abc.TaskGroup | None = None
        self._finished = anyio.Event()  # set when serve() returns
        # Connections waiting for a request after their first: closed at once by shutdown().
        self._keepalive: set[anyio.CancelScope] = set()

    @property
    def connections(self) -> int:
        return len(self._slots)

    @property
    def max_connections(self) -> int:
        return self._slots.max_connections

    @max_connections.setter
    def max_connections(self, value: int) -> None:  # a reload changes it
        self._slots.max_connections = value

    async def serve(
        self,
        listeners: Sequence[anyio.abc.Listener[Any]],
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled, or until :meth:`shutdown` has drained every connection."""
        try:
            async with anyio.create_task_group() as conns:
                self._conns = conns
                with anyio.CancelScope() as accepting:
                    self._accepting = accepting

                    def start(stream: anyio.abc.ByteStream) -> None:
                        conns.start_soon(self._connection, stream)

                    async with anyio.create_task_group() as accept:
                        accept.start_soon(self._slots.sweep)
                        for listener in listeners:
                            # A TCP listener may be several sockets (IPv4 and IPv6).
                            for inner in getattr(listener, "listeners", [listener]):
                                accept.start_soon(self._slots.accept_loop, inner, start)
                        task_status.started()
                # Only shutdown() gets here: closing now refuses newcomers instead of leaving
                # them in the backlog while in-flight requests finish under its deadline.
                with anyio.CancelScope(shield=True):
                    for listener in listeners:
                        await listener.aclose()
        finally:
            self._finished.set()

    async def shutdown(self, grace: float = 5.0) -> None:
        """Stop accepting, close idle keep-alive connections and let requests already begun
        finish (answered with ``Connection: close``) for at most *grace* seconds; return once
        :meth:`serve` has returned. A server that is not serving returns at once."""
        self._draining = True
        if self._conns is None:
            return
        for scope in self._keepalive:
            scope.cancel()
        if self._accepting is not None:
            self._accepting.cancel()
        deadline = anyio.current_time() + grace
        self._conns.cancel_scope.deadline = min(self._conns.cancel_scope.deadline, deadline)
        await self._finished.wait()

    async def _connection(self, stream: anyio.abc.ByteStream) -> None:
        with self._slots.hold() as scope:
            await self._serve_connection(stream, scope)

    async def _serve_connection(
        self, stream: anyio.abc.ByteStream, scope: anyio.CancelScope
    ) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_hdr)
        try:
            peer = peer_cred(stream)
        except OSError:
            peer = None
        async with stream:
            for served in range(1, self._max_requests + 1):
                if scope.cancel_called or (self._draining and served > 1):
                    return
                self._slots.idle(scope, self._idle)
                # A new connection's first request is expected (it raced the shutdown), so
                # it is not idle; nor is one whose next request is already buffered.
                if served > 1 and not conn.trailing_data[0]:
                    self._keepalive.add(scope)
                try:
                    event, headers, body = await self._read(conn, stream, scope)
                except _Reject as e:
                    await self._reject(conn, stream, e)
                    return
                except (TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    return
                finally:
                    self._keepalive.discard(scope)
                if event is None:
                    return
                self._slots.busy(scope)  # handling is not idling
                req = self._request(event, headers, body, peer)
                try:
                    resp = await self._handler(req)
                except AbortConnection:
                    return
                except Exception:  # a handler bug must not take the server down
                    log.exception("http.handler_failed", method=req.method, path=req.path)
                    resp = Response.json(
                        {"error": "internal_error", "message": "internal server error"}, 500
                    )
                last = served == self._max_requests  # told, so the client reconnects cleanly
                if scope.cancel_called:
                    return
                # The answer must be taken within the same deadline as a request.
                self._slots.idle(scope, self._idle)
                if not await self._send(conn, stream, resp, head=req.method == "HEAD", last=last):
                    return
                if conn.our_state is h11.MUST_CLOSE or self._draining:
                    return
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    return

    @staticmethod
    def _request(
        event: h11.Request, headers: list[tuple[bytes, bytes]], body: bytes, peer: PeerCred | None
    ) -> Request:
        target = event.target.decode("latin-1")
        parts = urlsplit(target)
        return Request(
            method=event.method.decode("ascii"),
            target=target,
            path=parts.path,
            query=parse_qs(parts.query),
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers],
            body=body,
            peer=peer,
        )

    async def _read(
        self, conn: h11.Connection, stream: anyio.abc.ByteStream, scope: anyio.CancelScope
    ) -> tuple[h11.Request | None, list[tuple[bytes, bytes]], bytes]:
        request: h11.Request | None = None
        headers: list[tuple[bytes, bytes]] = []  # (lower-cased name, value)
        body = bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as e:
                raise _Reject(e.error_status_hint, str(e) or "malformed request") from None
            if event is h11.NEED_DATA:
                data = await stream.receive(65536)
                self._keepalive.discard(scope)  # a request has begun: shutdown lets it finish
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                request = event
                # Listed once: h11's Headers is a Sequence whose every walk builds each pair.
                headers = list(event.headers)
                size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in headers)
                if size > self._max_hdr:
                    raise _Reject(431, f"request headers larger than {self._max_hdr} bytes")
                fields = dict(headers)
                length = fields.get(b"content-length")
                if length is not None and length.isdigit() and int(length) > self._max_body:
                    raise _Reject(413, f"body larger than {self._max_body} bytes")
                if b"expect" in fields:
                    raise _Reject(400, "Expect is not supported")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self._max_body:
                    raise _Reject(413, f"body larger than {self._max_body} bytes")
            elif isinstance(event, h11.EndOfMessage):
                return request, headers, bytes(body)
            else:  # ConnectionClosed, or PAUSED after a protocol switch
                return None, [], b""

    async def _send(
        self,
        conn: h11.Connection,
        stream: anyio.abc.ByteStream,
        resp: Response,
        *,
        head: bool,
        last: bool = False,
    ) -> bool:
        headers = [(k, v) for k, v in resp.headers if k.lower() != "content-length"]
        headers.append(("Content-Length", str(len(resp.body))))
        if self._draining or last:
            headers.append(("Connection", "close"))
        try:
            data = conn.send(h11.Response(status_code=resp.status, headers=headers)) or b""
            body = (conn.send(h11.Data(data=resp.body)) or b"") if not head and resp.body else b""
            end = conn.send(h11.EndOfMessage()) or b""
            if len(body) <= SEND_SLICE:
                if resp.pace is not None and body:
                    await resp.pace(len(body))
                await stream.send(data + body + end)
            else:  # a slice per send, each a checkpoint: the loop serves others in between
                await stream.send(data)
                for start in range(0, len(body), SEND_SLICE):
                    piece = body[start : start + SEND_SLICE]
                    if resp.pace is not None:
                        await resp.pace(len(piece))
                    await stream.send(piece)
                if end:
                    await stream.send(end)
        except (
            h11.LocalProtocolError,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
            OSError,
        ):
            return False
        return True

    async def _reject(self, conn: h11.Connection, stream: anyio.abc.ByteStream, e: _Reject) -> None:
        body = (
            json.dumps({"error": _REASONS.get(e.status, "bad_request"), "message": str(e)[:200]})
            + "\n"
        ).encode()
        head = (
            f"HTTP/1.1 {e.status} {'Bad Request' if e.status == 400 else 'Error'}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            with anyio.fail_after(self._idle):
                await stream.send(head + body)


# -- listeners --------------------------------------------------------------------------------


async def tcp_listener(host: str, port: int) -> anyio.abc.Listener[Any]:
    try:
        return await anyio.create_tcp_listener(local_host=host, local_port=port, reuse_port=False)
    except OSError as e:  # the bare "[Errno 98] Address already in use" names no address
        raise OSError(
            e.errno,
            f"cannot listen: {e.strerror or e} ({host}:{port}): "
            "stop the other process or choose another address",
        ) from None


def bound_port(listener: anyio.abc.Listener[Any]) -> int:
    inner = getattr(listener, "listeners", [listener])
    port: int = inner[0].extra(SocketAttribute.local_port)
    return port


def _alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


async def unix_listener(
    path: Path, *, mode: int = 0o660, gid: int | None = None
) -> anyio.abc.Listener[Any]:
    """Listen on *path*: a stale socket from a crashed run is replaced; a live one (another
    daemon) or a non-socket file at the path is an error, never deleted."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(
                errno.EEXIST,
                f"not a socket, refusing to replace it ({path}): "
                "remove it or choose another socket path",
            )
        if await anyio.to_thread.run_sync(_alive, path):
            raise OSError(
                errno.EADDRINUSE,
                f"another process is listening on the socket ({path}): "
                "stop it (imsd already running?) or choose another socket path",
            )
        await anyio.Path(path).unlink()
    try:
        listener = await anyio.create_unix_listener(path, mode=mode)
    except OSError as e:
        raise OSError(
            e.errno,
            f"cannot listen: {e.strerror or e} ({path}): "
            "check the socket's directory and the path's length",
        ) from None
    if gid is not None:
        os.chown(path, -1, gid)
    return listener
