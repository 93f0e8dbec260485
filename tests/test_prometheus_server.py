"""The shipped alert rules and Grafana dashboard in a real Prometheus (Debian's ``prometheus``)
scraping a real daemon against the fake IMS: the expiring-token alert goes pending, fires and
resolves as IMS fails and recovers, and every dashboard query returns data."""

from __future__ import annotations

import json
import re
import socket
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from imsd.daemon import Daemon
from imsd.fakeims.server import FakeIms

from tests.requirements import need_tool
from tests.support import uds, write_cred

pytestmark = [pytest.mark.anyio, pytest.mark.long]

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "imsd-alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "imsd-dashboard.json"

# The shipped expression, unchanged, must trigger: it fires under one hour (3,600 s) left. A
# token living 3,620 s, refreshed at 0.1 % of its life (every 3.6 s), has over 3,616 s left
# while IMS answers, and crosses the hour 20 s after the last success once IMS fails.
LIFETIME = 3620.0
REFRESH_FRACTION = 0.001
_FOR = re.compile(r"^(\s+for: )(\d+)m$", re.MULTILINE)


def scaled_rules(directory: Path) -> Path:
    """A copy of the shipped rules in which only each ``for: Nm`` becomes ``for: Ns``: a test
    cannot wait out 5 minutes. Every other line (expr, labels, annotations) stays identical."""
    text = RULES.read_text()
    scaled = _FOR.sub(r"\g<1>\g<2>s", text)
    kept = [line for line in text.splitlines() if not _FOR.match(line)]
    assert [line for line in scaled.splitlines() if not re.match(r"\s+for: \d+s$", line)] == kept
    assert len(_FOR.findall(text)) == text.count("alert:")  # every rule's `for:` was scaled
    path = directory / "imsd-alerts.scaled.yml"
    path.write_text(scaled)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            pytest.fail(f"prometheus exited {self.process.returncode}:\n{self.log.read_text()}")


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[int, Path], Prometheus]]:
    """``prometheus(port, rules)`` starts a Prometheus evaluating *rules* and scraping the
    daemon's metrics on *port* as job ``imsd``, every second; its data stays in tmp_path and
    it is killed at the end of the test."""
    binary = need_tool("prometheus", "apt-get install prometheus (.ci/run does)")
    started: list[subprocess.Popen[bytes]] = []

    def start(target: int, rules: Path) -> Prometheus:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files: [{json.dumps(str(rules))}]\n"
            "scrape_configs:\n  - job_name: imsd\n    static_configs:\n"
            f'      - targets: ["127.0.0.1:{target}"]\n'
        )
        port, log = free_port(), tmp_path / "prometheus.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        started.append(process)
        return Prometheus(f"http://127.0.0.1:{port}", process, log)

    yield start
    for process in started:
        process.kill()
        process.wait(timeout=30)


async def eventually(
    prom: Prometheus,
    check: Callable[[], Awaitable[bool]],
    what: str | Callable[[], str],
    limit: float,
) -> None:
    try:
        with anyio.fail_after(limit):
            while not await check():
                prom.check_alive()
                await anyio.sleep(0.25)
    except TimeoutError:
        pytest.fail(f"not within {limit:.0f} s: {what if isinstance(what, str) else what()}")


async def query(c: httpx.AsyncClient, expr: str) -> list[dict[str, Any]]:
    r = await c.get("/api/v1/query", params={"query": expr})
    assert r.status_code == 200, (expr, r.text)
    result: list[dict[str, Any]] = r.json()["data"]["result"]
    return result


async def rule_states(c: httpx.AsyncClient) -> dict[str, str]:
    r = await c.get("/api/v1/rules", params={"type": "alert"})
    r.raise_for_status()
    groups = r.json()["data"]["groups"]
    return {rule["name"]: rule["state"] for g in groups for rule in g["rules"]}


def dashboard_queries(instance: str) -> list[str]:
    """Every panel target's ``expr``, with Grafana's variables as Grafana would expand them
    for this one instance (a multi-value variable is a regex: its value escaped)."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {
        "$__rate_interval": "1m",
        "$__interval": "1s",
        "$__range": "5m",
        "$instance": re.escape(instance).replace("\\", "\\\\"),
        "$job": "imsd",
    }
    exprs = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name in sorted(variables, key=len, reverse=True):
                expr = expr.replace("${" + name[1:] + "}", variables[name])
                expr = expr.replace(name, variables[name])
            assert "$" not in expr, f"unexpanded variable in {target['expr']!r}"
            exprs.append(expr)
    assert exprs
    return exprs


async def test_alerts_and_dashboard_against_real_prometheus(
    fake: FakeIms,
    running: Callable[..., Awaitable[Daemon]],
    prometheus: Callable[[int, Path], Prometheus],
    tmp_path: Path,
) -> None:
    fake.state.token_lifetime = LIFETIME
    write_cred(tmp_path / "creds", "user", fake)
    d = await running(
        metrics_address="127.0.0.1:0", refresh_fraction=REFRESH_FRACTION, jitter_fraction=0.0
    )
    assert d.metrics_port
    async with uds(d) as s:  # a socket API request, for the dashboard's socket panel
        assert (await s.get("/v1/credentials")).status_code == 200
    prom = prometheus(d.metrics_port, scaled_rules(tmp_path))
    token_alert = "ImsdTokenExpiringSoon"

    async with httpx.AsyncClient(base_url=prom.url, timeout=10) as c:

        async def ready() -> bool:
            try:
                return (await c.get("/-/ready")).status_code == 200
            except httpx.TransportError:
                return False

        async def healthy() -> bool:
            up = await query(c, 'up{job="imsd"} == 1')
            states = await rule_states(c)
            return bool(up) and len(states) == 4 and set(states.values()) == {"inactive"}

        def state_is(name: str, *wanted: str) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return (await rule_states(c)).get(name) in wanted

            return check

        await eventually(prom, ready, "prometheus ready", 60)
        # While IMS answers: scraped, and no rule (ImsdDown included) pending or firing.
        await eventually(prom, healthy, "daemon scraped and every alert inactive", 30)

        fake.state.fail_next(10**9)
        await eventually(prom, state_is(token_alert, "pending"), f"{token_alert} pending", 60)
        await eventually(prom, state_is(token_alert, "firing"), f"{token_alert} firing", 30)
        await eventually(
            prom, state_is("ImsdRefreshFailing", "firing"), "ImsdRefreshFailing firing", 30
        )
        r = await c.get("/api/v1/alerts")
        firing = {
            a["labels"]["alertname"]: a["labels"]
            for a in r.json()["data"]["alerts"]
            if a["state"] == "firing"
        }
        assert firing[token_alert]["credential"] == "user"
        assert firing[token_alert]["severity"] == "critical"
        assert "ImsdDown" not in firing

        fake.state.fail_next(0)  # IMS recovers: the next retry mints a fresh token
        await eventually(prom, healthy, "every alert resolved after IMS recovered", 30)

        # The dashboard: the $instance variable's own query finds the daemon, and every panel
        # query then returns data from this Prometheus.
        r = await c.get("/api/v1/label/instance/values", params={"match[]": "imsd_build_info"})
        assert r.json()["data"] == [f"127.0.0.1:{d.metrics_port}"]
        exprs = dashboard_queries(f"127.0.0.1:{d.metrics_port}")
        empty: list[str] = []

        async def has_data(expr: str) -> bool:
            # A sample, and a number: histogram_quantile over no observations gives NaN.
            return any(s["value"][1] != "NaN" for s in await query(c, expr))

        async def all_have_data() -> bool:
            empty[:] = [e for e in exprs if not await has_data(e)]
            return not empty

        await eventually(prom, all_have_data, lambda: f"data for dashboard queries {empty}", 30)
