"""Prometheus metrics, on a registry owned by one daemon (never the global one).

Per-credential gauges are not stored: a collector reads the token store at scrape time, so
a removed credential's gauges disappear with it and can never go stale. Per-credential
counters are removed explicitly by :meth:`Metrics.forget`. Labels hold only credential names
(bounded by the operator's files), results, states and HTTP codes — never a token, URL or
error string.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Final

import anyio
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from imsd import __version__
from imsd.model import CredentialState
from imsd.store import TokenStore

__all__ = ["ADOPTED", "FLEET_EVENTS", "RESULTS", "Metrics"]

#: ``result`` label values of ``imsd_token_refresh_total``; in fleet mode also
#: :data:`ADOPTED` (a token another node minted, taken from Redis: no IMS request).
RESULTS = ("success", "permanent", "transient", "throttled")
ADOPTED: Final = "adopted"
#: ``event`` label values of ``imsd_fleet_events_total`` (README "Metrics and health").
FLEET_EVENTS: Final = (
    "lease_acquired",
    "lease_lost",
    "published",
    "adopted",
    "fenced_out",
    "rejected",
    "fallback_local",
    "waiting",
    "message_rejected",
)
_RESULT_INDEX: Final = {result: i for i, result in enumerate((*RESULTS, ADOPTED))}

# IMS answers in tens to hundreds of milliseconds; a hung request ends at the 30 s timeout.
_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # halves the series; nobody reads _created


#: A scrape's rendering is reused for this long: a scrape flood costs one rendering a second.
SCRAPE_CACHE: Final = 1.0

_Row = tuple[str, float | None, float | None, int | None]
_Frozen = tuple[
    list[_Row],
    dict[CredentialState, int],
    list[tuple[str, tuple[int, ...]]],
    frozenset[str] | None,
]


class _StoreCollector(Collector):
    """Reads the store as frozen on the event loop by :meth:`freeze`, so that the encoder
    can run in a worker thread while the loop goes on changing the store."""

    def __init__(self, store: TokenStore, clock: Callable[[], float]) -> None:
        self._store = store
        self._clock = clock
        self._frozen: _Frozen | None = None
        # imsd_token_refresh_total per credential, one int per result: a Counter child per
        # (credential, result) cost 2.5 KB a credential, created up front so rates start at 0.
        self.refresh_counts: dict[str, list[int]] = {}
        # Fleet mode (None without it): the credentials whose lease this node holds. Every
        # credential then has an imsd_fleet_holder series (0: a follower) and an "adopted"
        # refresh result, read here so that both go with their credential.
        self.holding: set[str] | None = None

    def freeze(self) -> None:
        rows: list[_Row] = [
            (
                e.name,
                e.grant.expires_at if e.grant is not None else None,
                e.last_refresh,
                e.consecutive_failures if e.credential is not None else None,
            )
            for e in self._store
        ]
        refreshes = [(name, tuple(counts)) for name, counts in self.refresh_counts.items()]
        holding = frozenset(self.holding) if self.holding is not None else None
        self._frozen = (rows, self._store.counts(self._clock()), refreshes, holding)

    def thaw(self) -> None:
        self._frozen = None

    def collect(self) -> Iterator[Metric]:
        expiry = GaugeMetricFamily(
            "imsd_token_expiry_timestamp_seconds",
            "When the current token of a credential expires (Unix time).",
            labels=["credential"],
        )
        success = GaugeMetricFamily(
            "imsd_token_last_success_timestamp_seconds",
            "When a credential's token was last obtained (Unix time).",
            labels=["credential"],
        )
        failures = GaugeMetricFamily(
            "imsd_credential_consecutive_failures",
            "Failed refresh attempts since the last success.",
            labels=["credential"],
        )
        states = GaugeMetricFamily("imsd_credentials", "Credentials by state.", labels=["state"])
        refresh = CounterMetricFamily(
            "imsd_token_refresh",
            "Token refresh attempts by result.",
            labels=["credential", "result"],
        )
        if self._frozen is None:  # called on the loop itself (render)
            self.freeze()
            assert self._frozen is not None
            rows, counts, refreshes, holding = self._frozen
            self.thaw()
        else:
            rows, counts, refreshes, holding = self._frozen
        results = RESULTS if holding is None else (*RESULTS, ADOPTED)
        for name, values in refreshes:
            for result, value in zip(results, values, strict=False):
                refresh.add_metric([name, result], value)
        for name, expires_at, last_refresh, failing in rows:
            if expires_at is not None:
                expiry.add_metric([name], expires_at)
            if last_refresh is not None:
                success.add_metric([name], last_refresh)
            if failing is not None:
                failures.add_metric([name], failing)
        for state, count in counts.items():
            states.add_metric([state.value], count)
        yield from (refresh, expiry, success, failures, states)
        if holding is not None:
            holder = GaugeMetricFamily(
                "imsd_fleet_holder",
                "Fleet mode: 1 while this node holds the credential's lease, 0 on a follower.",
                labels=["credential"],
            )
            for name, _, _, failing in rows:
                if failing is not None:  # a credential with a usable file
                    holder.add_metric([name], 1 if name in holding else 0)
            yield holder

    def describe(self) -> Iterator[Metric]:
        return iter(())  # dynamic: nothing to check for duplicates at registration


class Metrics:
    def __init__(self, store: TokenStore, *, clock: Callable[[], float] = time.time) -> None:
        self.registry = r = CollectorRegistry()
        self.refresh_duration = Histogram(
            "token_refresh_duration_seconds",
            "Duration of token requests to IMS.",
            namespace="imsd",
            buckets=_BUCKETS,
            registry=r,
        )
        self.ims_requests = Counter(
            "ims_requests",
            "HTTP requests to IMS by status code (or network_error).",
            ["code"],
            namespace="imsd",
            registry=r,
        )
        self.socket_requests = Counter(
            "socket_requests",
            "Requests served on the API socket by endpoint and status.",
            ["endpoint", "code"],
            namespace="imsd",
            registry=r,
        )
        self._socket_children: dict[tuple[str, int], Counter] = {}
        self.connections = Counter(
            "http_connection_events",
            "Connections shed (idle, for a newcomer), refused (all busy) and failed accept()s"
            " per listener.",
            ["listener", "event"],
            namespace="imsd",
            registry=r,
        )
        # The authenticating proxies (README "Proxy"): answers by instance and status (or
        # upstream_error, upstream_timeout, client_gone), and the upstream's time to answer.
        self.proxy_requests = Counter(
            "proxy_requests",
            "Requests through the authenticating proxies by instance and status.",
            ["instance", "status"],
            namespace="imsd",
            registry=r,
        )
        self.proxy_upstream = Histogram(
            "proxy_upstream_seconds",
            "Time from sending a proxied request upstream to its response headers.",
            ["instance"],
            namespace="imsd",
            buckets=_BUCKETS,
            registry=r,
        )
        build = Gauge("build_info", "imsd version.", ["version"], namespace="imsd", registry=r)
        build.labels(__version__).set(1)
        self._collector = _StoreCollector(store, clock)
        r.register(self._collector)
        self._scrapes: dict[str, tuple[float, bytes]] = {}  # content type -> (when, body)
        self._fleet: tuple[Counter, Gauge] | None = None  # fleet mode only
        self._render_lock = anyio.Lock()
        self.renderings = 0  # how many times the exposition was encoded (tests, bench)

    def added(self, credential: str) -> None:
        self._scrapes.clear()  # a new credential's series show at the next scrape
        # Every result from zero, so that rates exist before the first failure.
        self._collector.refresh_counts.setdefault(credential, [0] * len(_RESULT_INDEX))

    def refreshed(self, credential: str, result: str, duration: float) -> None:
        counts = self._collector.refresh_counts.setdefault(credential, [0] * len(_RESULT_INDEX))
        counts[_RESULT_INDEX[result]] += 1
        if result == ADOPTED:  # no IMS request: not in the request-duration histogram
            self._fleet_metrics()
        else:
            self.refresh_duration.observe(duration)

    def forget(self, credential: str) -> None:
        self._scrapes.clear()  # a removed credential's series never outlive it
        self._collector.refresh_counts.pop(credential, None)
        if self._collector.holding is not None:
            self._collector.holding.discard(credential)

    def socket_request(self, endpoint: str, status: int) -> None:
        """Count one socket API answer. The children are kept (endpoints and statuses are a
        small set): ``labels()`` validates its arguments on every call, per request."""
        child = self._socket_children.get((endpoint, status))
        if child is None:
            child = self._socket_children[endpoint, status] = self.socket_requests.labels(
                endpoint, str(status)
            )
        child.inc()

    def connection_event(self, listener: str, event: str) -> None:
        self.connections.labels(listener, event).inc()

    # -- fleet mode (imsd.fleetredis): registered at the first event, so a daemon without
    # coordination exposes none of these series.

    def _fleet_metrics(self) -> tuple[Counter, Gauge]:
        if self._fleet is None:
            r = self.registry
            self._scrapes.clear()
            self._collector.holding = set()  # imsd_fleet_holder and result="adopted" show
            self._fleet = (
                Counter(
                    "fleet_events",
                    "Fleet mode events: lease_acquired, lease_lost, published, adopted,"
                    " fenced_out, rejected, fallback_local, waiting, message_rejected.",
                    ["event"],
                    namespace="imsd",
                    registry=r,
                ),
                Gauge(
                    "fleet_redis_up",
                    "Redis reachable (1) or not (0).",
                    namespace="imsd",
                    registry=r,
                ),
            )
            # Every event from zero, so that rates and alerts exist before the first one.
            for event in FLEET_EVENTS:
                self._fleet[0].labels(event)
        return self._fleet

    def fleet_event(self, event: str) -> None:
        self._fleet_metrics()[0].labels(event).inc()

    def fleet_up(self, up: bool) -> None:
        self._fleet_metrics()[1].set(1 if up else 0)

    def fleet_holder(self, credential: str, holder: bool) -> None:
        self._fleet_metrics()
        holding = self._collector.holding
        assert holding is not None
        self._scrapes.clear()
        if holder:
            holding.add(credential)
        else:
            holding.discard(credential)

    def ims_response(self, code: int | str) -> None:
        self.ims_requests.labels(str(code)).inc()

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition for a scrape, OpenMetrics when the scraper asks for it."""
        encoder, content_type = choose_encoder(accept or "")
        self.renderings += 1
        return encoder(self.registry), content_type

    async def scrape(self, accept: str | None) -> tuple[bytes, str]:
        """:meth:`render` for the metrics listener: encoded in a worker thread (35k series
        take long enough to stall token reads on the loop), one rendering at a time, and
        reused for :data:`SCRAPE_CACHE` seconds by every scraper asking the same format."""
        encoder, content_type = choose_encoder(accept or "")
        async with self._render_lock:
            cached = self._scrapes.get(content_type)
            if cached is not None and time.monotonic() - cached[0] < SCRAPE_CACHE:
                return cached[1], content_type
            self._collector.freeze()
            try:
                self.renderings += 1
                body = await anyio.to_thread.run_sync(encoder, self.registry)
            finally:
                self._collector.thaw()
            self._scrapes[content_type] = (time.monotonic(), body)
            return body, content_type
