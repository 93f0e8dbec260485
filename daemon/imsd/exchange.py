"""The thin I/O driver for auth flows: HTTP/1.1 with keep-alive (:mod:`imsd.upstream`, the
proxy's lean h11 client), a global concurrency cap and a rate limit.

TLS verification is always on; no environment proxy, netrc or extra CA bundle applies to
these secret-bearing requests. Plain ``http://`` is refused except to loopback (the fake
IMS). Response bodies are asked for and read uncompressed, with a size cap on the raw bytes
(a compressed answer is refused), and every transport failure becomes a
TRANSIENT :class:`~imsd.model.ImsError` whose message holds no request content.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import Final
from urllib.parse import urlencode, urlsplit

import anyio

from imsd import __version__
from imsd.flows import Flow, check_grant, debug_id
from imsd.model import (
    Grant,
    HttpRequest,
    HttpResponse,
    ImsError,
    ImsErrorKind,
    https_or_loopback,
)
from imsd.schedule import RateLimiter
from imsd.upstream import Upstream, UpstreamError, UpstreamTimeout

__all__ = ["ImsClient", "check_url"]

MAX_BODY: Final = 1 << 20
_TOKEN: Final = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")  # an RFC 9110 token
USER_AGENT: Final = f"imsd/{__version__}"


def check_url(url: str) -> None:
    if https_or_loopback(url):
        return
    raise ImsError(
        ImsErrorKind.PERMANENT, "insecure_url", "IMS URLs must be https (http only to loopback)"
    )


def _headers(request: HttpRequest, body: bytes | None) -> list[tuple[str, str]]:
    """The flow's headers, with ``Accept-Encoding: identity`` whatever the flow asked: the
    body cap counts raw bytes, so nothing may arrive compressed."""
    names = {k.lower() for k in request.headers}
    defaults = (("User-Agent", USER_AGENT), ("Accept", "*/*"))
    out = [(k, v) for k, v in defaults if k.lower() not in names]
    out += [(k, v) for k, v in request.headers.items() if k.lower() != "accept-encoding"]
    out.append(("Accept-Encoding", "identity"))
    if body is not None and "content-type" not in names:
        out.append(("Content-Type", "application/x-www-form-urlencoded"))
    return out


def _merged(headers: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Lower-cased names; a repeated field's values joined with commas (RFC 9110 5.3)."""
    out: dict[str, str] = {}
    for k, v in headers:
        k = k.lower()
        out[k] = f"{out[k]}, {v}" if k in out else v
    return out


def _step(flow: Flow, response: HttpResponse | None) -> HttpRequest:
    """Advance an auth method's flow. A plugin's own bug becomes a transient ImsError that
    names only the exception type (its message could quote a secret), never a crash."""
    try:
        return next(flow) if response is None else flow.send(response)
    except (StopIteration, ImsError):
        raise
    except Exception as e:
        raise ImsError(
            ImsErrorKind.TRANSIENT, "auth_method_error", f"the auth flow raised {type(e).__name__}"
        ) from None


class ImsClient:
    def __init__(
        self,
        *,
        max_concurrent: int = 8,
        rate: float | None = 20.0,
        burst: int = 8,
        timeout: float = 30.0,
        max_body: int = MAX_BODY,
        on_response: Callable[[int | str], None] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limiter = anyio.CapacityLimiter(max_concurrent)
        self._max_concurrent = max_concurrent
        self._rate = RateLimiter(rate, burst)
        self._timeout = timeout
        self._max_body = max_body
        self._on_response = on_response
        self._clock = clock
        self._monotonic = monotonic  # exchange ages (tests step it to play a stuck exchange)
        self._since: dict[object, float] = {}  # exchange owner → when its exchange began
        self._http: Upstream | None = None

    async def __aenter__(self) -> ImsClient:
        # As many pooled connections as requests may be in flight: none is opened and
        # closed per request. No SSL_CERT_FILE: the system's and certifi's trust only.
        self._http = Upstream(
            self._timeout, max_idle=self._max_concurrent, trust_env=False, peer="IMS"
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def run(self, flow: Flow) -> Grant:
        """Drive *flow* to its Grant, sending each request it yields. An error the flow
        raises on an answer carries that answer's ``x-debug-id`` (whatever the flow did)."""
        response: HttpResponse | None = None  # the answer being handled, if any
        try:
            try:
                request = _step(flow, None)
                while True:
                    response = None
                    response = await self.send(request, owner=flow)
                    request = _step(flow, response)
            except StopIteration as stop:
                grant = stop.value
                if not isinstance(grant, Grant):
                    raise ImsError(
                        ImsErrorKind.TRANSIENT,
                        "auth_method_error",
                        "the auth flow returned no Grant",
                    ) from None
                # A third-party flow may build its Grant without parse_token_response's checks.
                return check_grant(grant)
        except ImsError as e:
            if e.debug_id is None and response is not None:
                e.debug_id = debug_id(response)
            raise
        finally:
            flow.close()

    async def _read_body(
        self, status: int, headers: dict[str, str], chunks: AsyncIterator[bytes]
    ) -> bytes:
        """The raw body, refused once it exceeds the cap. Raw bytes, never decoded ones: a
        compressed answer (sent although identity was asked) is refused before its body is
        read, so a small gzip bomb cannot expand into gigabytes, one chunk at a time."""

        def refuse(code: str, why: str) -> ImsError:
            self._note(status)
            return ImsError(
                ImsErrorKind.TRANSIENT,
                code,
                why,
                status=status,
                debug_id=debug_id(HttpResponse(status, headers, b"")),
            )

        encoding = headers.get("content-encoding", "").strip().lower() or "identity"
        if encoding != "identity":
            shown = encoding if _TOKEN.fullmatch(encoding) else "?"
            raise refuse("response_compressed", f"IMS response is encoded ({shown[:20]})")
        too_large = f"IMS response exceeds {self._max_body} bytes"
        length = headers.get("content-length", "")
        if length.isascii() and length.isdigit() and int(length) > self._max_body:
            raise refuse("response_too_large", too_large)
        body = bytearray()
        async for chunk in chunks:
            body += chunk
            if len(body) > self._max_body:
                raise refuse("response_too_large", too_large)
        return bytes(body)

    def _note(self, code: int | str) -> None:
        if self._on_response is not None:
            self._on_response(code)

    async def send(self, request: HttpRequest, *, owner: object = None) -> HttpResponse:
        """One exchange: *request* sent, the whole answer read, within :attr:`deadline`
        (the connection's own timeouts are per read: an IMS dripping a byte a second would
        never trip them). Waiting for a slot under the concurrency cap and the rate limit is not
        counted. *owner* (the flow, from :meth:`run`) names the exchange for
        :meth:`overran`."""
        if self._http is None:
            raise RuntimeError("ImsClient is not open (use 'async with')")
        check_url(request.url)
        key = owner if owner is not None else object()
        async with self._limiter:
            delay = self._rate.reserve(time.monotonic())
            if delay > 0:
                await anyio.sleep(delay)
            self._since[key] = self._monotonic()
            try:
                with anyio.fail_after(self._timeout):
                    status, headers, body = await self._exchange(request)
            except TimeoutError:
                self._note("network_error")
                raise ImsError(
                    ImsErrorKind.TRANSIENT,
                    "timeout",
                    f"no complete answer within {self._timeout:g}s",
                ) from None
            finally:
                del self._since[key]
        self._note(status)
        return HttpResponse(status, headers, body)

    async def _exchange(self, request: HttpRequest) -> tuple[int, dict[str, str], bytes]:
        assert self._http is not None
        body = urlencode(request.form).encode() if request.form else None
        try:
            # A token request may go twice: if a pooled connection turns out closed before
            # any answer, it is sent again on a new one rather than failing the refresh.
            resp = await self._http.request(
                request.method, request.url, _headers(request, body), body, idempotent=True
            )
            try:
                headers = _merged(resp.headers)
                return (
                    resp.status,
                    headers,
                    await self._read_body(resp.status, headers, resp.chunks()),
                )
            finally:
                await resp.aclose()
        except UpstreamTimeout:
            raise TimeoutError from None  # one message for a per-read and the overall timeout
        except UpstreamError as e:
            self._note("network_error")
            host = urlsplit(request.url).netloc.rpartition("@")[2]  # never a userinfo part
            raise ImsError(ImsErrorKind.TRANSIENT, "network_error", f"{e} ({host})") from None

    @property
    def deadline(self) -> float:
        """Seconds an exchange may take, from sending the request to the body's last byte."""
        return self._timeout

    def overran(self, owner: object, grace: float) -> bool:
        """Whether *owner*'s exchange in progress has outlived :attr:`deadline` by more than
        *grace* seconds: the deadline did not fire (a blocked loop, a bug), which the
        systemd watchdog must see (:meth:`imsd.supervisor.Supervisor.stuck`)."""
        since = self._since.get(owner)
        return since is not None and self._monotonic() - since > self._timeout + grace
