"""The HTTP handlers: the socket API (credentials, tokens, headers, forced refresh, health)
and the metrics listener (``/metrics``, ``/livez``, ``/readyz``).

They read the token store; the only thing that reaches back is a forced refresh, which goes
through the supervisor's single-flight and a per-credential minimum interval, so a thousand
callers cost IMS at most one request.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, Final, Protocol, runtime_checkable

import structlog

from imsd.httpserver import Request, Response
from imsd.logs import LogThrottle
from imsd.metrics import Metrics
from imsd.model import Credential, CredentialState
from imsd.plugin import Product
from imsd.render import (
    RenderError,
    document_safe,
    instance_entry,
    instances,
    product_env,
    product_headers,
    rfc3339,
)
from imsd.store import Entry, TokenStore
from imsd.supervisor import Supervisor

__all__ = ["Api", "FleetRoles", "HealthApi", "default_allowed_uids", "readiness"]

log = structlog.get_logger("imsd.api")

_CRED = re.compile(r"^/v1/credentials/([A-Za-z0-9._-]{1,64})/(token|headers|refresh)$")
_SERVING: Final = (CredentialState.VALID, CredentialState.STALE)
_REFUSAL_LOG_EVERY: Final = 60.0  # seconds between two refusal log lines for one uid


@runtime_checkable
class FleetRoles(Protocol):
    """What the API asks of fleet mode (:class:`imsd.fleetredis.Fleet`, which is imported
    only with ``coordination``)."""

    async def roles(self, creds: Iterable[Credential]) -> dict[str, tuple[str, str | None]]: ...


def default_allowed_uids() -> frozenset[int]:
    return frozenset({0, os.getuid()})


def _error(
    status: int, code: str, message: str, *, debug_id: str | None = None, **headers: str
) -> Response:
    """An error body; ``debug_id`` (IMS's ``x-debug-id`` behind a failed refresh) only when
    there is one."""
    body = {"error": code, "message": message}
    if debug_id is not None:
        body["debug_id"] = debug_id
    return Response.json(body, status=status, headers=list(headers.items()) or None)


def readiness(store: TokenStore, now: float) -> tuple[bool, dict[str, str]]:
    """Ready when every credential with a usable file has a token that is still valid."""
    failing: dict[str, str] = {}
    for entry in store:
        state = entry.state(now)
        if entry.credential is not None and state not in _SERVING:
            failing[entry.name] = f"{state.value}: {entry.error() or 'no token yet'}"
    return not failing, failing


def _health(
    path: str, store: TokenStore, clock: Callable[[], float], *, detail: bool
) -> Response | None:
    """``/livez`` and ``/readyz``. Without *detail* (the unauthenticated TCP listener) the
    failing credentials are counted, not named: names and IMS error texts are for the
    peer-checked socket."""
    if path == "/livez":
        return Response.json({"status": "ok"})
    if path == "/readyz":
        ready, failing = readiness(store, clock())
        return Response.json(
            {
                "status": "ready" if ready else "not ready",
                "failing": failing if detail else len(failing),
            },
            status=200 if ready else 503,
        )
    return None


class Api:
    """The socket API. Every connection's peer credentials are checked before routing."""

    def __init__(
        self,
        supervisor: Supervisor,
        products: Mapping[str, Product],
        *,
        metrics: Metrics | None = None,
        allowed_uids: Collection[int] | None = None,
        allowed_gids: Collection[int] = (),
        min_refresh_interval: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.supervisor = supervisor
        self.store = supervisor.store
        self.products = products
        self.metrics = metrics
        self.allowed_uids: frozenset[int] = frozenset()
        self.allowed_gids: frozenset[int] = frozenset()
        self.min_refresh_interval = min_refresh_interval
        self.set_access(
            allowed_uids=allowed_uids,
            allowed_gids=allowed_gids,
            min_refresh_interval=min_refresh_interval,
        )
        self._clock = clock
        # Refusals are counted in the socket_requests metric; the log says it once a minute
        # per uid, so a refused client in a loop cannot fill the disk.
        self._refusals = LogThrottle(_REFUSAL_LOG_EVERY)
        # The token document only changes with the credential or the grant: render it once.
        self._documents: dict[str, tuple[object, object, Response]] = {}

    def set_access(
        self,
        *,
        allowed_uids: Collection[int] | None,
        allowed_gids: Collection[int],
        min_refresh_interval: float,
    ) -> None:
        """Who may use the socket and how often a refresh may be forced; a reload calls it,
        and the next request on any connection, old or new, is checked against it."""
        self.allowed_uids = frozenset(
            default_allowed_uids() if allowed_uids is None else allowed_uids
        )
        self.allowed_gids = frozenset(allowed_gids)
        self.min_refresh_interval = min_refresh_interval

    async def handle(self, req: Request) -> Response:
        resp, endpoint = await self._route(req)
        if self.metrics is not None:
            self.metrics.socket_request(endpoint, resp.status)
        return resp

    def _allowed(self, req: Request) -> bool:
        peer = req.peer
        if peer is None:
            return False  # the socket API is Unix-only; no peer means no identity
        if peer.uid in self.allowed_uids or peer.gid in self.allowed_gids:
            return True
        return not self.allowed_gids.isdisjoint(peer.groups)  # supplementary groups

    def _log_refusal(self, req: Request) -> None:
        peer = req.peer
        uid = peer.uid if peer else None
        suppressed = self._refusals.due(uid, time.monotonic())
        if suppressed is None:
            return
        log.warning(
            "api.peer_refused",
            uid=uid,
            gid=peer.gid if peer else None,
            pid=peer.pid if peer else None,
            path=req.path,
            suppressed=suppressed,  # refusals of this uid not logged since its last line
        )

    async def _route(self, req: Request) -> tuple[Response, str]:
        if not self._allowed(req):
            self._log_refusal(req)
            return _error(403, "forbidden", "this user may not use the imsd socket"), "refused"
        health = _health(req.path, self.store, self._clock, detail=True)
        if health is not None:
            return health, req.path.lstrip("/")
        if req.path == "/v1/credentials":
            if req.method != "GET":
                return _error(405, "method_not_allowed", "use GET", Allow="GET"), "credentials"
            return await self._list(), "credentials"
        m = _CRED.match(req.path)
        if m is None:
            return _error(404, "not_found", f"no such endpoint: {req.path}"), "unknown"
        name, action = m.groups()
        want = "POST" if action == "refresh" else "GET"
        if req.method != want:
            return _error(405, "method_not_allowed", f"use {want}", Allow=want), action
        entry = self.store.get(name)
        if entry is None:
            return _error(404, "unknown_credential", f"no credential named {name!r}"), action
        if action == "token":
            return self._token(entry), action
        if action == "headers":
            return self._headers(entry, req.query.get("product", [None])[0]), action
        return await self._refresh(entry), action

    async def _roles(self, entries: list[Entry]) -> dict[str, tuple[str, str | None]] | None:
        """Fleet mode only: each credential's role on this node and the lease holder."""
        fleet = self.supervisor.fleet
        if not isinstance(fleet, FleetRoles):
            return None
        return await fleet.roles(e.credential for e in entries if e.credential is not None)

    async def _list(self) -> Response:
        entries = self.store.snapshot()
        roles = await self._roles(entries)
        now = self._clock()
        items: list[dict[str, Any]] = []
        for e in entries:
            row: dict[str, Any] = {
                "name": e.name,
                "state": e.state(now).value,
                "products": [n for n, _ in e.credential.product_instances] if e.credential else [],
                "expires_at": rfc3339(e.grant.expires_at) if e.grant else None,
                "last_refresh": rfc3339(e.last_refresh) if e.last_refresh else None,
                "last_error": e.error(),
                "debug_id": e.error_debug_id(),
            }
            if roles is not None:  # fleet mode: who mints this credential's token
                got = roles.get(e.name)
                row["fleet"] = {"role": got[0], "holder": got[1]} if got else None
            items.append(row)
        return Response.json({"credentials": items})

    def _unavailable(self, entry: Entry) -> Response | None:
        state = entry.state(self._clock())
        if state in _SERVING and entry.credential is not None and entry.grant is not None:
            return None
        reason = entry.error() or "the first token has not been fetched yet"
        code = {CredentialState.EXPIRED: "expired", CredentialState.INVALID: "invalid"}.get(
            state, "not_ready"
        )
        return _error(
            503,
            code,
            f"{entry.name}: {state.value}: {reason}",
            debug_id=entry.error_debug_id(),
            **{"Retry-After": "5"},
        )

    def _token(self, entry: Entry) -> Response:
        unavailable = self._unavailable(entry)
        if unavailable is not None:
            return unavailable
        cred, grant = entry.credential, entry.grant
        assert cred is not None
        assert grant is not None
        # With what its products discovered (Analytics' company id); the same object until
        # the credential or the discovery changes, so the cache below holds.
        cred = self.supervisor.discovery.resolved(cred, grant, self.products)
        cached = self._documents.get(entry.name)
        if cached is not None and cached[0] is cred and cached[1] is grant:
            return cached[2]
        # As token.json: an instance that cannot be rendered is left out, never the token.
        resp = Response.json(document_safe(cred, grant, self.products))
        if len(self._documents) > 4 * len(self.store) + 64:  # forget removed credentials
            self._documents.clear()
        self._documents[entry.name] = (cred, grant, resp)
        return resp

    def _headers(self, entry: Entry, product: str | None) -> Response:
        unavailable = self._unavailable(entry)
        if unavailable is not None:
            return unavailable
        cred, grant = entry.credential, entry.grant
        assert cred is not None
        assert grant is not None
        known = dict(instances(cred, self.products))
        product = product or next(iter(known))
        plugin = known.get(product)
        if plugin is None:  # not an instance, or (never after validation) one of no plugin
            return _error(
                404,
                "unknown_product",
                f"{entry.name} has no product {product!r} (it has: {', '.join(known)})",
            )
        cred = self.supervisor.discovery.resolved(cred, grant, self.products)
        try:
            headers = product_headers(cred, grant, plugin, product)
            env = product_env(cred, grant, plugin, product)
            about = instance_entry(cred, plugin, product, headers)
        except RenderError as e:
            return _error(500, "render_failed", str(e))
        # "type", "base_url" and "base_urls" are additions; "product", "headers", "env" as ever.
        return Response.json({"product": product, **about, "env": env})

    async def _refresh(self, entry: Entry) -> Response:
        if entry.credential is None:
            return self._unavailable(entry) or _error(503, "invalid", "credential is invalid")
        now = self._clock()
        try:
            allowed_at = self.supervisor.forced_refresh_at(entry.name, self.min_refresh_interval)
        except KeyError:
            return _error(404, "unknown_credential", f"no credential named {entry.name!r}")
        if allowed_at is not None and now < allowed_at:
            # Too soon after the last attempt, or inside a failing credential's backoff: IMS
            # is not asked (its rate budget is shared by every credential).
            wait = str(max(1, math.ceil(allowed_at - now)))
            if entry.consecutive_failures == 0 and self._unavailable(entry) is None:
                resp = self._token(entry)  # possibly the cached document: never mutate it
                return Response(resp.status, resp.body, [*resp.headers, ("Retry-After", wait)])
            return _error(
                429,
                "too_many_requests",
                f"{entry.name}: the next attempt is allowed in {wait} s"
                + (f" (last error: {entry.error()})" if entry.error() else ""),
                debug_id=entry.error_debug_id(),
                **{"Retry-After": wait},
            )
        last = entry.last_refresh
        try:
            await self.supervisor.refresh(entry.name)
        except KeyError:
            return _error(404, "unknown_credential", f"no credential named {entry.name!r}")
        current = self.store.get(entry.name)
        if current is None:
            return _error(404, "unknown_credential", f"no credential named {entry.name!r}")
        if current.last_refresh == last and current.consecutive_failures:
            # The attempt failed; the old token (if any) is still served by GET .../token.
            return _error(
                502,
                "refresh_failed",
                f"{entry.name}: {current.error()}",
                debug_id=current.error_debug_id(),
            )
        return self._token(current)


class HealthApi:
    """The TCP listener: ``/metrics``, ``/livez``, ``/readyz``. No credential data."""

    def __init__(
        self, store: TokenStore, metrics: Metrics, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.metrics = metrics
        self._clock = clock

    async def handle(self, req: Request) -> Response:
        if req.method not in ("GET", "HEAD"):
            return _error(405, "method_not_allowed", "use GET", Allow="GET, HEAD")
        if req.path == "/metrics":
            body, content_type = await self.metrics.scrape(req.header("accept"))
            return Response(200, body, [("Content-Type", content_type)])
        health = _health(req.path, self.store, self._clock, detail=False)
        if health is not None:
            return health
        return _error(404, "not_found", f"no such endpoint: {req.path}")
