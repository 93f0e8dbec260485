"""The authenticating forward proxy: ``[[proxy]]`` listeners that send each request to one
product instance's base URL with the credential's headers injected (README "Proxy").

The pure parts decide what goes where: :func:`upstream_url` (the request target joined to
the instance's base URL; it can never pick the host: no open proxy), :func:`request_headers`
(hop-by-hop headers dropped as RFC 9110 section 7.6.1 says, the client's own values of the
injected headers replaced, never merged) and :func:`response_headers`. The I/O driver,
:class:`Proxy`, speaks HTTP/1.1 with h11 on each connection and through
:class:`~imsd.upstream.Upstream` (h11 too, a keep-alive pool) upstream, and streams bodies
both ways chunk by chunk: a request or answer of any size costs a few buffers.

A 401 from upstream means the token was revoked or expired early: the credential is refreshed
once (the supervisor's single-flight, the socket API's minimum interval between forced
refreshes) and an idempotent request without a body is sent again with the new token. A
request with a body is never replayed: its bytes were streamed, not kept.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import anyio
import anyio.abc
import h11
import structlog

from imsd.admission import Refusal, admit
from imsd.config import ProxySpec
from imsd.httpserver import IDLE_TIMEOUT, PeerCred, Slots, StreamWrapper, peer_cred
from imsd.logs import LogThrottle
from imsd.metrics import Metrics
from imsd.model import CredentialState
from imsd.plugin import Product
from imsd.render import RenderError, instances, product_headers, product_urls
from imsd.supervisor import Supervisor
from imsd.tcppeer import tcp_peer
from imsd.upstream import Upstream, UpstreamError, UpstreamResponse, UpstreamTimeout

__all__ = [
    "HOP_BY_HOP",
    "Access",
    "BadTarget",
    "Proxy",
    "request_headers",
    "response_headers",
    "upstream_url",
]

log = structlog.get_logger("imsd.proxy")

#: RFC 9110 section 7.6.1 (and the de facto Keep-Alive, Proxy-Connection): meaningful for one
#: connection only, never forwarded; plus the names a request's ``Connection`` lists.
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
#: Set by the proxy or its HTTP client, never by the client: the upstream host is fixed, and
#: a 100-continue is answered here.
_OWN: Final = frozenset({"host", "expect", "authorization", "x-api-key"})
#: Methods that may be sent twice (RFC 9110 section 9.2.2) when the first got a 401.
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
_HEAD_TIMEOUT: Final = 30.0  # for a request's head to arrive (idle keep-alive, slow loris)
_MAX_HEAD: Final = 64 * 1024
_CHUNK: Final = 65536
_SEPARATORS: Final = re.compile(r"[/\\]")
_REFUSAL_LOG_EVERY: Final = 60.0  # seconds between two log lines for one kind of refusal


class BadTarget(ValueError):
    """The request target cannot be sent to the instance (the message is safe to show)."""


# -- the pure parts ---------------------------------------------------------------------------


def upstream_url(base: str, target: str) -> str:
    """*target* (the request line's origin-form ``/path?query``) appended to *base*. Only the
    path and query come from the client: absolute targets (``http://other/``), authority
    and asterisk forms, dot segments (even percent-encoded), fragments and control or space
    characters are refused, and the result is checked to keep *base*'s scheme and host."""
    if not target.startswith("/"):
        raise BadTarget("only origin-form targets (/path?query): this proxy picks the host")
    if any(c <= " " or c == "\x7f" or c in "#\\" for c in target):
        raise BadTarget("the target has a space, control character, backslash or fragment")
    path, _, query = target.partition("?")
    if _dot_segments(path):
        raise BadTarget("dot segments (. and ..) are not allowed in the path")
    url = base.rstrip("/") + path + (f"?{query}" if query else "")
    want, got = urlsplit(base), urlsplit(url)
    if (got.scheme, got.netloc) != (want.scheme, want.netloc):  # belt and braces
        raise BadTarget("the target would change the upstream host")
    return url


def _dot_segments(path: str) -> bool:
    """Whether *path* has a ``.`` or ``..`` segment as some upstream may read it: decoded
    once or twice (``%2e%2e``, ``%252e``), with encoded slashes and backslashes as
    separators (``..%2f``, ``%5c..``; nginx and IIS decode before they resolve), and with a
    ``;parameter`` dropped (``..;`` is ``..`` to Tomcat and Jetty)."""
    once = unquote(path)
    for form in (path, once, unquote(once)):
        for seg in _SEPARATORS.split(form):
            if seg.partition(";")[0] in (".", ".."):
                return True
    return False


def _connection_named(headers: Iterable[tuple[str, str]]) -> set[str]:
    """The names listed by ``Connection`` headers: hop-by-hop for this message."""
    named: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            named.update(t.strip().lower() for t in value.split(",") if t.strip())
    return named


def request_headers(
    client: Sequence[tuple[str, str]], injected: Mapping[str, str]
) -> list[tuple[str, str]]:
    """What goes upstream: the client's headers without hop-by-hop ones, ``Host``,
    ``Expect``, credentials, or any name in *injected* (compared without case), then
    *injected*: the credential's values replace the client's, never join them."""
    drop = HOP_BY_HOP | _OWN | _connection_named(client) | {k.lower() for k in injected}
    out = [(k, v) for k, v in client if k.lower() not in drop]
    out.extend(injected.items())
    return out


def response_headers(upstream: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """What goes back to the client: the upstream's headers without hop-by-hop ones (h11
    frames the body itself: ``Content-Length`` passes, chunking is redone)."""
    drop = HOP_BY_HOP | _connection_named(upstream)
    return [(k, v) for k, v in upstream if k.lower() not in drop]


def allowed_peer(peer: PeerCred | None, uids: Collection[int], gids: Collection[int]) -> bool:
    """The socket API's rule (README "Security model"): the uid, or the primary or a
    supplementary group, is allowed."""
    if peer is None:
        return False
    return peer.uid in uids or peer.gid in gids or any(g in gids for g in peer.groups)


# -- the I/O driver ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Access:
    """Who may use a Unix-socket proxy and how often a refresh may be forced: the socket
    API's current settings (a reload changes them)."""

    uids: frozenset[int]
    gids: frozenset[int]
    min_refresh_interval: float


class _ClientGone(Exception):
    """The client closed its connection or sent a broken body mid-request."""


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.code, self.retry_after = status, code, retry_after


class _Taken(StreamWrapper):
    """A client's connection whose every write must be taken within the proxy's
    ``take_timeout`` (the slots' sweeper cancels it otherwise; it is sheddable meanwhile):
    a client that stops reading frees its slot and its upstream connection."""

    def __init__(self, stream: anyio.abc.ByteStream, proxy: Proxy, scope: anyio.CancelScope):
        super().__init__(stream)
        self._proxy, self._scope = proxy, scope

    def idle(self, seconds: float) -> None:
        self._proxy.slots.idle(self._scope, seconds)

    def busy(self) -> None:
        self._proxy.slots.busy(self._scope)

    async def send(self, item: bytes) -> None:
        self.idle(self._proxy.take_timeout)
        try:
            await self._inner.send(item)
        finally:
            self.busy()


class Proxy:
    """One ``[[proxy]]`` listener's server."""

    def __init__(
        self,
        spec: ProxySpec,
        supervisor: Supervisor,
        products: Mapping[str, Product],
        *,
        access: Callable[[], Access],
        metrics: Metrics | None = None,
        max_connections: int = 1024,
        clock: Callable[[], float],
    ) -> None:
        self.spec = spec
        self.supervisor = supervisor
        self.products = products
        self._access = access
        self._metrics = metrics
        self._clock = clock
        # Two descriptors a connection (the client's, the upstream's): the daemon's cap
        # counts them against its descriptor reserve.
        self.slots = Slots(f"proxy:{spec.product}", max_connections, metrics)
        self.take_timeout = IDLE_TIMEOUT  # for each write to the client to be taken
        # No environment proxies, no redirects followed (a Location elsewhere goes back to
        # the client as it came), no default headers (the request is built here).
        self.upstream = Upstream(spec.timeout)
        # The metrics' children, made at their first use (labels() takes a lock each call).
        self._counters: dict[str, Any] = {}
        self._seconds: Any = None
        # The last rendering: (resolved credential, grant, base URL, headers).
        self._rendered: tuple[object, object, str, dict[str, str]] | None = None
        self._refusals = LogThrottle(_REFUSAL_LOG_EVERY)

    async def serve(
        self,
        listener: anyio.abc.Listener[Any],
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            async with anyio.create_task_group() as tg:

                def start(stream: anyio.abc.ByteStream) -> None:
                    tg.start_soon(self._connection, stream)

                tg.start_soon(self.slots.sweep)
                for inner in getattr(listener, "listeners", [listener]):
                    tg.start_soon(self.slots.accept_loop, inner, start)
                task_status.started()
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()
                await self.upstream.aclose()

    @property
    def connections(self) -> int:
        return len(self.slots)

    async def _connection(self, stream: anyio.abc.ByteStream) -> None:
        with self.slots.hold() as scope:
            try:
                async with stream:
                    await self._serve_connection(_Taken(stream, self, scope))
            except (_ClientGone, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass
            except Exception as e:  # a bug here must end this connection, never the daemon
                log.error(
                    "proxy.connection_failed", instance=self.spec.product, error=type(e).__name__
                )

    async def _peer(self, stream: _Taken) -> PeerCred | None:
        """Who connected: SO_PEERCRED on a Unix socket, the client socket's owner on TCP."""
        try:
            return peer_cred(stream) if not self.spec.tcp else await tcp_peer(stream)
        except OSError:
            return None

    async def _serve_connection(self, stream: _Taken) -> None:
        peer: PeerCred | None = None
        looked_up = False  # on TCP at the first request: idle connections cost no lookup
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        while True:
            # Idle keep-alive and slow-loris clients time out, and may be shed meanwhile.
            stream.idle(_HEAD_TIMEOUT)
            try:
                event = await _next_event(conn, stream)
            except h11.RemoteProtocolError as e:
                await _send_error(conn, stream, e.error_status_hint, "bad_request", str(e))
                return
            stream.busy()
            if not isinstance(event, h11.Request):
                return  # closed, or timed out waiting for a request
            if self.spec.checks_peers:
                if not looked_up:
                    peer, looked_up = await self._peer(stream), True
                access = self._access()
                if not allowed_peer(peer, access.uids, access.gids):
                    uid = peer.uid if peer else None
                    suppressed = self._refusals.due(("peer", uid), anyio.current_time())
                    if suppressed is not None:
                        log.warning("proxy.peer_refused", uid=uid, suppressed=suppressed)
                    self._count("refused")
                    await _send_error(
                        conn, stream, 403, "forbidden", "this user may not use this proxy"
                    )
                    return
            refusal = admit(
                event.method.decode("ascii", "replace"),
                ((k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers),
                tcp=self.spec.tcp,
                allowed_hosts=self.spec.allowed_hosts,
                allowed_origins=self.spec.allowed_origins,
            )
            if refusal is not None:
                await self._not_admitted(conn, stream, refusal)
                return
            await self._exchange(conn, stream, event)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _not_admitted(
        self, conn: h11.Connection, stream: anyio.abc.ByteStream, refusal: Refusal
    ) -> None:
        """A request this listener never signs (imsd.admission): counted every time, logged
        once a minute per reason; the connection closes after the answer."""
        self._count(str(refusal.status))
        suppressed = self._refusals.due(refusal.code, anyio.current_time())
        if suppressed is not None:
            log.warning(
                "proxy.request_refused",
                instance=self.spec.product,
                reason=refusal.code,
                suppressed=suppressed,  # refusals of this reason not logged since the last line
            )
        extra = [("Allow", refusal.allow)] if refusal.allow else []
        await _send_error(conn, stream, refusal.status, refusal.code, refusal.message, extra=extra)

    def _count(self, status: str) -> None:
        if self._metrics is not None:
            counter = self._counters.get(status)
            if counter is None:
                counter = self._metrics.proxy_requests.labels(self.spec.product, status)
                self._counters[status] = counter
            counter.inc()

    def _render(self) -> tuple[str, dict[str, str], object]:
        """The instance's base URL and headers with the current token, and that token's
        grant (to tell whether a refresh changed it)."""
        name, instance = self.spec.credential, self.spec.product
        entry = self.supervisor.store.get(name)
        if entry is None:
            raise _Refused(503, "unknown_credential", f"no credential named {name!r}", 5)
        cred, grant = entry.credential, entry.grant
        state = entry.state(self._clock())
        if cred is None or grant is None or state not in _SERVING:
            reason = entry.error() or "the first token has not been fetched yet"
            raise _Refused(503, "not_ready", f"{name}: {state.value}: {reason}", 5)
        # With what its products discovered: the same object until the credential or the
        # discovery changes (the socket API caches on it too), so the rendering is kept.
        resolved = self.supervisor.discovery.resolved(cred, grant, self.products)
        rendered = self._rendered
        if rendered is not None and rendered[0] is resolved and rendered[1] is grant:
            return rendered[2], rendered[3], grant
        plugin = dict(instances(cred, self.products)).get(instance)
        if plugin is None:
            raise _Refused(503, "unknown_product", f"{name} has no product {instance!r}")
        try:
            headers = product_headers(resolved, grant, plugin, instance)
            base, _ = product_urls(resolved, plugin, instance)
        except RenderError as e:
            raise _Refused(503, "render_failed", str(e), 5) from None
        if base is None:
            raise _Refused(
                503, "no_base_url", f"{name}: {instance!r} has no base URL: set base_url"
            )
        self._rendered = (resolved, grant, base, headers)
        return base, headers, grant

    async def _refreshed(self, before: object) -> bool:
        """Force one refresh (single-flight, minimum interval respected); whether the grant
        is now another one."""
        name = self.spec.credential
        try:
            allowed_at = self.supervisor.forced_refresh_at(
                name, self._access().min_refresh_interval
            )
            if allowed_at is None or self._clock() >= allowed_at:
                await self.supervisor.refresh(name)
        except KeyError:
            return False
        entry = self.supervisor.store.get(name)
        return entry is not None and entry.grant is not None and entry.grant is not before

    async def _exchange(self, conn: h11.Connection, stream: _Taken, req: h11.Request) -> None:
        method = req.method.decode("ascii")
        client_headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in req.headers]
        has_body = any(
            k == b"transfer-encoding" or (k == b"content-length" and v != b"0")
            for k, v in req.headers
        )
        if not has_body:  # its EndOfMessage is already parsed: take it, for keep-alive
            with anyio.fail_after(_HEAD_TIMEOUT):
                await _next_event(conn, stream)
        try:
            base, injected, grant = self._render()
            url = upstream_url(base, req.target.decode("latin-1"))
        except _Refused as e:
            await self._refuse(conn, stream, e)
            return
        except BadTarget as e:
            self._count("400")
            await _send_error(conn, stream, 400, "bad_target", str(e))
            return
        retry = method in IDEMPOTENT and not has_body
        while True:
            body = _body(conn, stream, self.spec.timeout) if has_body else None
            headers = request_headers(client_headers, injected)
            started = anyio.current_time()
            try:
                resp = await self.upstream.request(method, url, headers, body)
            except _ClientGone:
                self._count("client_gone")
                raise
            except UpstreamTimeout:
                self._count("upstream_timeout")
                await _send_error(conn, stream, 504, "upstream_timeout", "the upstream timed out")
                return
            except UpstreamError as e:
                await self._upstream_failed(conn, stream, e)
                return
            if self._metrics is not None:
                if self._seconds is None:
                    self._seconds = self._metrics.proxy_upstream.labels(self.spec.product)
                self._seconds.observe(anyio.current_time() - started)
            try:
                if resp.status == 401 and retry:
                    retry = False
                    if await self._refreshed(grant):
                        try:
                            base, injected, grant = self._render()
                        except _Refused as e:
                            await self._refuse(conn, stream, e)
                            return
                        log.info("proxy.retry_after_401", instance=self.spec.product)
                        continue  # the finally below closes the 401 first
                await self._relay(conn, stream, resp)  # a 401 too, when no new token came
                return
            finally:
                await resp.aclose()  # pooled if read to its end, else closed (shielded)

    async def _relay(
        self, conn: h11.Connection, stream: anyio.abc.ByteStream, resp: UpstreamResponse
    ) -> None:
        try:
            # As bytes: h11 encodes a str as ASCII, and a value may carry obs-text (8-bit).
            fields = [
                (k.encode("latin-1"), v.encode("latin-1"))
                for k, v in response_headers(resp.headers)
            ]
            head = h11.Response(
                status_code=resp.status, headers=fields, reason=resp.reason.encode("latin-1")
            )
        except (h11.LocalProtocolError, UnicodeEncodeError) as e:  # nothing sent yet: a 502
            await self._upstream_failed(conn, stream, e)
            return
        self._count(str(resp.status))
        await stream.send(conn.send(head) or b"")
        try:
            async for chunk in resp.chunks():
                await stream.send(conn.send(h11.Data(data=chunk)) or b"")
            await stream.send(conn.send(h11.EndOfMessage()) or b"")
        except (UpstreamError, h11.LocalProtocolError):
            # The head is sent: the client can only learn by the connection closing early.
            log.warning("proxy.upstream_broke_body", instance=self.spec.product)
            raise _ClientGone from None

    async def _upstream_failed(
        self, conn: h11.Connection, stream: anyio.abc.ByteStream, e: Exception
    ) -> None:
        """A 502 for an upstream that failed or answered what cannot be relayed."""
        self._count("upstream_error")
        cause = type(e.__cause__ or e).__name__
        # Our own wording for an UpstreamError; an h11 message could quote upstream's bytes.
        reason = str(e) if isinstance(e, UpstreamError) else None
        log.warning("proxy.upstream_failed", instance=self.spec.product, error=cause, reason=reason)
        await _send_error(conn, stream, 502, "upstream_error", "the upstream failed")

    async def _refuse(
        self, conn: h11.Connection, stream: anyio.abc.ByteStream, e: _Refused
    ) -> None:
        self._count(str(e.status))
        await _send_error(conn, stream, e.status, e.code, str(e), e.retry_after)


_SERVING: Final = (CredentialState.VALID, CredentialState.STALE)


async def _next_event(conn: h11.Connection, stream: anyio.abc.ByteStream) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        try:
            data = await stream.receive(_CHUNK)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            data = b""
        conn.receive_data(data)


async def _body(conn: h11.Connection, stream: _Taken, idle: float) -> AsyncIterator[bytes]:
    """The client's request body as it arrives; _ClientGone if it stops short. Each piece
    must come within *idle* seconds; meanwhile the connection waits on its client: it may
    be shed for a newcomer (a body dripped a byte at a time is the idlest of all)."""
    if conn.they_are_waiting_for_100_continue:
        await stream.send(conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
    while True:
        stream.idle(idle)
        try:
            event = await _next_event(conn, stream)
        except (h11.RemoteProtocolError, OSError):
            raise _ClientGone from None
        finally:
            stream.busy()
        if isinstance(event, h11.Data):
            yield bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            return
        else:
            raise _ClientGone


async def _send_error(
    conn: h11.Connection,
    stream: anyio.abc.ByteStream,
    status: int,
    code: str,
    message: str,
    retry_after: int | None = None,
    *,
    extra: Sequence[tuple[str, str]] = (),
) -> None:
    """A JSON error (the socket API's shape); the connection closes after it."""
    body = (json.dumps({"error": code, "message": message[:300]}) + "\n").encode()
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
        *extra,
    ]
    if retry_after is not None:
        headers.append(("Retry-After", str(max(1, math.ceil(retry_after)))))
    with contextlib.suppress(h11.LocalProtocolError, anyio.BrokenResourceError, OSError):
        data = conn.send(h11.Response(status_code=status, headers=headers)) or b""
        data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        with anyio.fail_after(_HEAD_TIMEOUT):
            await stream.send(data)
