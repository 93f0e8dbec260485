"""The metrics registry: scrapes rendered off the loop, once per interval under a flood."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from imsd.metrics import Metrics
from imsd.scheduler import Record
from imsd.store import TokenStore

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
        body, _ = await metrics.scrape(None)
        bodies.append(body)

    async with anyio.create_task_group() as tg:
        for _ in range(100):
            tg.start_soon(scrape)
    assert metrics.renderings == 1
    assert len(set(bodies)) == 1
    assert b'credential="cred-7"' in bodies[0]
    # OpenMetrics is its own rendering; a removed credential is gone from the next scrape.
    om, content_type = await metrics.scrape("application/openmetrics-text")
    assert content_type.startswith("application/openmetrics-text")
    assert om.endswith(b"# EOF\n")
    store.remove("cred-7")
    metrics.forget("cred-7")
    body, _ = await metrics.scrape(None)
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
