"""The proxy's upstream side: a small HTTP/1.1 client on h11 with a keep-alive pool per origin
(README "Proxy").

It does what the proxy needs and nothing else: no redirects, no environment proxies, no
cookies, no content decoding; bodies stream both ways. A general client (httpx) checked every
pooled connection for readability on every request and built a request object per call; here
a connection is taken from its origin's pool last in, first out, after one poll of its own
socket (a server that closed it has left an end of file there), and an idempotent request
without a body that finds its pooled connection closed anyway before any byte of an answer
(the server closed it meanwhile) is sent once more on a new one. A connection goes back to
the pool only when its exchange finished cleanly both ways: a response not read to its end
is closed, never reused.

``timeout`` bounds the connect, each read and write, as httpx's did, and the answer's whole
head (a head dripped a byte at a time, or endless ``100 Continue``, times out too); it ends
in :class:`UpstreamTimeout`, any other failure of the upstream in :class:`UpstreamError`.
A body may take as long as it takes while bytes keep coming.
Exceptions from the request body's iterator (the client went away) pass through unchanged,
and the upstream connection is closed so the server sees the request end short.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from typing import Final
from urllib.parse import urlsplit

import anyio
import anyio.abc
import h11
import httpx

__all__ = ["Upstream", "UpstreamError", "UpstreamResponse", "UpstreamTimeout", "framing_error"]

_CHUNK: Final = 65536
_MAX_HEAD: Final = 256 * 1024
#: Failures that mean the connection is gone (closed, reset, or spoke no HTTP).
_BROKEN: Final = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    h11.ProtocolError,
    OSError,
)

#: Methods that may be sent twice (RFC 9110 section 9.2.2).
_IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})

Origin = tuple[str, str, int]


class UpstreamError(Exception):
    """The upstream could not be reached or broke the exchange."""


class UpstreamTimeout(UpstreamError):
    """The upstream did not connect, or went silent for ``timeout`` seconds."""


def framing_error(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """What makes an answer's framing ambiguous, or None. Both ``Content-Length`` and
    ``Transfer-Encoding`` is the mark of request smuggling or response splitting (RFC 9112
    section 6.3): refused, and the connection dropped, rather than guessing which one holds."""
    names = {k.lower() for k, _ in headers}
    if b"content-length" in names and b"transfer-encoding" in names:
        return "answered with both Content-Length and Transfer-Encoding"
    return None


class _Conn:
    __slots__ = ("h11", "received", "sock", "stream")

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEAD)
        self.sock: socket.socket | None = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
        self.received = False  # any byte of the current response

    def idle_alive(self) -> bool:
        """Whether the server left it open while it was idle: nothing to read (an end of
        file, or bytes nobody asked for, make the socket readable)."""
        fd = self.sock.fileno() if self.sock is not None else -1
        if fd < 0:
            return self.sock is None  # no socket to look at (trust it), or one closed
        poll = select.poll()
        poll.register(fd, select.POLLIN)
        return not poll.poll(0)

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True), contextlib.suppress(*_BROKEN):
            await self.stream.aclose()


class UpstreamResponse:
    """A response whose head has arrived; its body is read with :meth:`chunks`, and
    :meth:`aclose` must follow (it pools the connection or closes it)."""

    def __init__(self, owner: Upstream, origin: Origin, conn: _Conn, head: h11.Response) -> None:
        self.status = head.status_code
        self.reason = head.reason.decode("latin-1")
        self.headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers]
        self._owner, self._origin, self._conn = owner, origin, conn
        self._closed = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (raw: no decoding); UpstreamError if it breaks off."""
        while True:
            event = await self._owner._event(self._conn)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise UpstreamError(f"{self._owner.peer} closed mid-body")

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        conn = self._conn.h11
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            await self._owner._release(self._origin, self._conn)
        else:
            await self._conn.aclose()


class Upstream:
    """Keep-alive pools (one per scheme, host and port), at most *max_idle* idle
    connections each."""

    def __init__(
        self,
        timeout: float,
        *,
        max_idle: int = 128,
        trust_env: bool = True,
        peer: str = "the upstream",
    ) -> None:
        self.timeout = timeout
        self.peer = peer  # how errors name the server ("IMS" for the token client)
        self.max_idle = max_idle
        self._trust_env = trust_env  # SSL_CERT_FILE / SSL_CERT_DIR extend the trust store
        self.connects = 0  # connections opened (tests count reuse)
        self._idle: dict[Origin, list[_Conn]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._closed = False

    async def request(
        self,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]],
        body: bytes | AsyncIterable[bytes] | None = None,
        *,
        idempotent: bool = False,
    ) -> UpstreamResponse:
        """Send *method* *url* with *headers* (``Host`` is added from *url*; give a
        ``Content-Length`` or this adds ``Transfer-Encoding: chunked`` for a streamed *body*)
        and return once the response head has arrived. *idempotent* vouches that this
        request may be sent twice whatever its method (an IMS token request: a second token
        harms nobody); only a request whose body is bytes or absent is ever sent twice."""
        parts = urlsplit(url)
        scheme = parts.scheme
        port = parts.port or (443 if scheme == "https" else 80)
        origin = (scheme, parts.hostname or "", port)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        head = [("Host", parts.netloc.rpartition("@")[2]), *headers]
        if isinstance(body, bytes):
            head = [(k, v) for k, v in head if k.lower() != "content-length"]
            head.append(("Content-Length", str(len(body))))
        elif body is not None and not any(k.lower() == "content-length" for k, _ in head):
            head.append(("Transfer-Encoding", "chunked"))
        try:
            # As bytes: h11 encodes a str as ASCII, and a value may carry obs-text (8-bit).
            fields = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in head]
            req = h11.Request(method=method, target=target, headers=fields)
        except (h11.LocalProtocolError, UnicodeEncodeError) as e:
            raise UpstreamError(f"the request cannot be sent to {self.peer}") from e
        # Sent again only if nothing of it can have been acted on (RFC 9110 section 9.2.2).
        replayable = body is None or isinstance(body, bytes)
        may_retry = replayable and (idempotent or method in _IDEMPOTENT)
        while True:
            conn, pooled = await self._acquire(origin)
            try:
                return await self._exchange(origin, conn, req, body)
            except _Stale:
                await conn.aclose()
                if not (pooled and may_retry):
                    raise UpstreamError(f"{self.peer} closed the connection") from None
                may_retry = False  # the server closed it while it sat idle: once more, anew
            except BaseException:
                await conn.aclose()
                raise

    async def _exchange(
        self,
        origin: Origin,
        conn: _Conn,
        req: h11.Request,
        body: bytes | AsyncIterable[bytes] | None,
    ) -> UpstreamResponse:
        # A body in bytes goes in one write with the head and its end.
        whole = self._encode(conn, req, body) if isinstance(body, bytes) else None
        try:
            if whole is not None:
                await self._write(conn, whole)
            else:
                await self._send(conn, req)
                if body is not None and not isinstance(body, bytes):
                    async for chunk in body:  # its own errors (the client left) pass as is
                        if chunk:
                            await self._send(conn, h11.Data(data=chunk))
                await self._send(conn, h11.EndOfMessage())
        except UpstreamTimeout:
            raise
        except UpstreamError:
            if body is None or isinstance(body, bytes):
                raise _Stale from None
            # The server may have answered early and closed (a 401 before the body): read on.
        # The whole head, informational answers (100 Continue) included, within one timeout:
        # an upstream dripping a byte at a time never lets a single read wait that long.
        try:
            with anyio.fail_after(self.timeout):
                head = await self._head(conn)
        except TimeoutError:
            raise UpstreamTimeout(f"{self.peer} did not answer in time") from None
        if (error := framing_error(head.headers)) is not None:
            raise UpstreamError(f"{self.peer} {error}")  # request() drops the connection
        return UpstreamResponse(self, origin, conn, head)

    async def _head(self, conn: _Conn) -> h11.Response:
        while True:
            try:
                event = await self._event(conn)
            except UpstreamTimeout:
                raise
            except UpstreamError:
                if not conn.received:
                    raise _Stale from None
                raise
            if isinstance(event, h11.Response):
                return event
            if not isinstance(event, h11.InformationalResponse):  # 100 Continue: skipped
                raise UpstreamError(f"{self.peer} closed before answering")

    async def _send(self, conn: _Conn, event: h11.Event) -> None:
        try:
            data = conn.h11.send(event)
        except h11.ProtocolError as e:
            raise UpstreamError(f"{self.peer} broke the connection") from e
        if data:
            await self._write(conn, data)

    def _encode(self, conn: _Conn, req: h11.Request, body: bytes) -> bytes:
        try:
            events = (req, h11.Data(data=body), h11.EndOfMessage())
            return b"".join(conn.h11.send(event) or b"" for event in events)
        except h11.ProtocolError as e:
            raise UpstreamError(f"the request cannot be sent to {self.peer}") from e

    async def _write(self, conn: _Conn, data: bytes) -> None:
        try:
            with anyio.fail_after(self.timeout):
                await conn.stream.send(data)
        except TimeoutError:
            raise UpstreamTimeout(f"{self.peer} did not take the request") from None
        except _BROKEN as e:
            raise UpstreamError(f"{self.peer} broke the connection") from e

    async def _event(self, conn: _Conn) -> object:
        try:
            while (event := conn.h11.next_event()) is h11.NEED_DATA:
                with anyio.fail_after(self.timeout):
                    try:
                        data = await conn.stream.receive(_CHUNK)
                    except anyio.EndOfStream:
                        data = b""
                conn.received = conn.received or bool(data)
                conn.h11.receive_data(data)
        except TimeoutError:
            raise UpstreamTimeout(f"{self.peer} went silent") from None
        except _BROKEN as e:
            raise UpstreamError(f"{self.peer} broke the connection") from e
        return event

    async def _acquire(self, origin: Origin) -> tuple[_Conn, bool]:
        if self._closed:
            raise UpstreamError(f"closing: no new connection to {self.peer}")
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be timed out
            if conn.idle_alive():
                conn.received = False
                return conn, True
            await conn.aclose()
        scheme, host, port = origin
        try:
            with anyio.fail_after(self.timeout):
                if scheme == "https":
                    if self._ssl is None:
                        self._ssl = httpx.create_ssl_context(trust_env=self._trust_env)
                    stream: anyio.abc.ByteStream = await anyio.connect_tcp(
                        host, port, ssl_context=self._ssl, tls_standard_compatible=False
                    )
                else:
                    stream = await anyio.connect_tcp(host, port)
        except TimeoutError:
            raise UpstreamTimeout(f"{self.peer} did not connect") from None
        except (OSError, ssl.SSLError, anyio.BrokenResourceError) as e:
            raise UpstreamError(f"{self.peer} did not connect") from e
        self.connects += 1
        return _Conn(stream), False

    async def _release(self, origin: Origin, conn: _Conn) -> None:
        idle = self._idle.setdefault(origin, [])
        if self._closed or len(idle) >= self.max_idle:
            await conn.aclose()
        else:
            idle.append(conn)

    async def aclose(self) -> None:
        """Close every idle connection; a response still open closes its own when done."""
        self._closed = True
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                await conn.aclose()


class _Stale(Exception):
    """The connection failed before any byte of a response came."""
