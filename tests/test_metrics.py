"""The metrics registry: scrapes rendered off the loop, once per interval under a flood."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from imsd.api import HealthApi
from imsd.httpserver import HttpServer, bound_port, tcp_listener
from imsd.metrics import RENDER_SHARE, SCRAPE_CACHE, Metrics
from imsd.scheduler import Record
from imsd.store import TokenStore
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

pytestmark = pytest.mark.anyio


async def test_a_scrape_flood_renders_once_and_sees_removals() -> None:
    store = TokenStore()
    for i in range(200):
        store.put(Record(f"cred-{i}", Path(f"/c/cred-{i}.toml")))
    metrics = Metrics(store)
    for i in range(200):
        metrics.added(f"cred-{i}")
    bodies: list[bytes] = []

    async def scrape() -> None:
        body, _, _ = await metrics.scrape(None)
        bodies.append(body)

    async with anyio.create_task_group() as tg:
        for _ in range(100):
            tg.start_soon(scrape)
    assert metrics.renderings == 1
    assert len(set(bodies)) == 1
    assert b'credential="cred-7"' in bodies[0]
    # OpenMetrics is its own rendering; a removed credential is gone from the next scrape.
    om, content_type, _ = await metrics.scrape("application/openmetrics-text")
    assert content_type.startswith("application/openmetrics-text")
    assert om.endswith(b"# EOF\n")
    store.remove("cred-7")
    metrics.forget("cred-7")
    body, _, _ = await metrics.scrape(None)
    assert b'credential="cred-7"' not in body
    assert metrics.renderings == 3


def test_refresh_counts_start_at_zero_and_go_with_their_credential() -> None:
    store = TokenStore()
    metrics = Metrics(store)
    metrics.added("alpha")
    metrics.refreshed("alpha", "throttled", 0.2)
    metrics.refreshed("alpha", "throttled", 0.3)
    text = metrics.render(None)[0].decode()
    for result, value in (("success", 0), ("permanent", 0), ("transient", 0), ("throttled", 2)):
        line = f'imsd_token_refresh_total{{credential="alpha",result="{result}"}} {value}.0'
        assert line in text
    assert "imsd_token_refresh_duration_seconds_count 2.0" in text
    metrics.forget("alpha")
    assert 'credential="alpha"' not in metrics.render(None)[0].decode()


def _store(n: int) -> tuple[TokenStore, list[str]]:
    store = TokenStore()
    names = [f"cred-{i}" for i in range(n)]
    for name in names:
        store.put(Record(name, Path(f"/c/{name}.toml")))
    return store, names


class _SlowCollector(Collector):
    """A rendering that takes *cost* seconds of the fake clock (advanced in the encoder's
    thread, as a real rendering's time passes)."""

    def __init__(self, clock: list[float], cost: float) -> None:
        self.clock, self.cost = clock, cost

    def collect(self) -> Iterator[Metric]:
        self.clock[0] += self.cost
        yield GaugeMetricFamily("slow", "A rendering that takes its time.", value=1)


async def test_a_slow_rendering_is_reused_for_ten_times_as_long_as_it_took() -> None:
    """Issue 23 item 11: with 5,000 credentials a rendering (~0.2 s, the GIL held by the
    encoder's thread) came every second under a scrape flood. Now at most every
    RENDER_SHARE × its cost: a tenth of the time."""
    clock = [1000.0]
    store, _names = _store(3)
    metrics = Metrics(store, monotonic=lambda: clock[0])
    metrics.registry.register(_SlowCollector(clock, 0.5))
    await metrics.scrape(None)
    assert metrics.renderings == 1
    done = clock[0]  # the rendering ended here, 0.5 s after it began
    clock[0] = done + SCRAPE_CACHE + 0.5  # past the 1 s cache, within 10 × 0.5 s
    await metrics.scrape(None)
    assert metrics.renderings == 1
    clock[0] = done + RENDER_SHARE * 0.5
    await metrics.scrape(None)
    assert metrics.renderings == 2
    # A cheap rendering is still reused for SCRAPE_CACHE only.
    fast = Metrics(store, monotonic=lambda: clock[0])
    await fast.scrape(None)
    clock[0] += SCRAPE_CACHE
    await fast.scrape(None)
    assert fast.renderings == 2


async def test_concurrent_scrapers_share_one_rendering_gzip_and_one_byte_rate() -> None:
    """Issue 23 item 11: four scrapers of 5,000 credentials' 2.5 MB took 60 % of the loop
    in send(). Over the real metrics listener: gzip for whoever accepts it (Prometheus and
    httpx do), one rendering and one compression for all; every byte of every answer paced
    by the one byte rate."""
    store, names = _store(2000)
    metrics = Metrics(store)
    for name in names:
        metrics.added(name)
    listener = await tcp_listener("127.0.0.1", 0)
    port = bound_port(listener)
    async with anyio.create_task_group() as tg:
        await tg.start(HttpServer(HealthApi(store, metrics).handle).serve, [listener])
        sent: list[int] = []
        plain: list[bytes] = []
        unpacked: list[bytes] = []
        compressed: list[bytes] = []

        async def scrape(encoding: str) -> None:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
                async with c.stream("GET", "/metrics", headers={"Accept-Encoding": encoding}) as r:
                    raw = b"".join([chunk async for chunk in r.aiter_raw()])
                sent.append(len(raw))
                assert r.headers["Vary"] == "Accept, Accept-Encoding"
                if encoding.startswith("gzip,") or encoding == "gzip":
                    assert r.headers["Content-Encoding"] == "gzip"
                    compressed.append(raw)
                    unpacked.append(gzip.decompress(raw))
                else:
                    assert "Content-Encoding" not in r.headers
                    plain.append(raw)

        async with anyio.create_task_group() as scrapers:
            for encoding in ("gzip", "identity", "gzip;q=0", "gzip, deflate") * 4:
                scrapers.start_soon(scrape, encoding)
        tg.cancel_scope.cancel()
    assert metrics.renderings == 1
    assert len(set(plain)) == 1
    assert len(plain) == 8
    assert set(unpacked) == set(plain)
    assert b'credential="cred-1999"' in plain[0]
    assert len(set(compressed)) == 1
    assert len(compressed) == 8
    assert len(compressed[0]) * 10 < len(plain[0])
    assert metrics.paced == sum(sent)
