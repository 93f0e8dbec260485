"""Fleet mode seen from outside (README "Fleet mode (Redis)", "Metrics and health"): the
role and the lease holder per credential in ``GET /v1/credentials`` and ``imsd status``, and
the ``imsd_fleet_*`` series, with two in-process daemons sharing a real ``redis-server``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from imsd.cli import main
from imsd.daemon import Daemon
from imsd.fakeims.server import FakeIms
from imsd.metrics import Metrics
from imsd.model import Credential, Secret
from imsd.scheduler import Record
from imsd.store import TokenStore

from tests.support import read, uds, wait_for, write_cred

# The fleet fixtures: a real redis-server, the fake IMS with short tokens, in-process nodes.
from tests.test_fleet import RedisServer, nodes, redis, short  # noqa: F401

pytestmark = pytest.mark.anyio


async def _rows(d: Daemon) -> list[dict[str, Any]]:
    async with uds(d) as c:
        r = await c.get("/v1/credentials")
    assert r.status_code == 200
    rows: list[dict[str, Any]] = r.json()["credentials"]
    return rows


def _metric(d: Daemon, line: str) -> bool:
    return line in d.metrics.render(None)[0].decode()


def _value(d: Daemon, series: str) -> float:
    """The sample of *series* (its name and labels as rendered), 0 when absent."""
    for line in d.metrics.render(None)[0].decode().splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_status_shows_one_holder_and_followers_naming_it(
    nodes: Any,  # noqa: F811
    short: FakeIms,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    a = await nodes(0)
    b = await nodes(1)
    await wait_for(lambda: a.token and a.token == b.token, 15)
    holder, follower = (a, b) if a.fleet.role("alpha") == "holder" else (b, a)
    node = holder.fleet.node
    assert [(await _rows(n.d))[0]["fleet"] for n in (holder, follower)] == [
        {"role": "holder", "holder": node},
        {"role": "follower", "holder": node},
    ]
    # The same through imsd status: a ROLE and a HOLDER column.
    for n, role in ((holder, "holder"), (follower, "follower")):
        sock = str(n.d.settings.socket)
        code = await anyio.to_thread.run_sync(main, ["status", "--socket", sock])
        assert code == 0
        out = capsys.readouterr().out.splitlines()  # (the daemons log to stdout too)
        head, line = (next(s for s in out if s.startswith(w)) for w in ("NAME ", "alpha "))
        assert head.split()[:5] == ["NAME", "STATE", "EXPIRES", "ROLE", "HOLDER"]
        assert line.split()[:5] == ["alpha", "valid", line.split()[2], role, node]
    # The metrics say the same: 1 on the holder, 0 on the follower, which adopted.
    assert _metric(holder.d, 'imsd_fleet_holder{credential="alpha"} 1.0')
    assert _metric(follower.d, 'imsd_fleet_holder{credential="alpha"} 0.0')
    assert _metric(holder.d, 'imsd_fleet_events_total{event="lease_acquired"} 1.0')
    assert _metric(holder.d, "imsd_fleet_redis_up 1.0")
    # At least one: the short tokens are adopted again every couple of seconds, so on a
    # loaded machine the count may be past 1 by the time it is looked at.
    adopted = 'imsd_token_refresh_total{credential="alpha",result="adopted"}'
    await wait_for(lambda: _value(follower.d, adopted) >= 1, 15)
    # An adopted token cost no IMS request: it is not a success of this node's.
    assert _metric(follower.d, 'imsd_token_refresh_total{credential="alpha",result="success"} 0.0')


async def test_with_redis_down_the_role_is_local(
    nodes: Any,  # noqa: F811
    redis: RedisServer,  # noqa: F811
) -> None:
    a = await nodes(0)
    await wait_for(lambda: a.token, 15)
    await wait_for(lambda: _metric(a.d, 'imsd_fleet_holder{credential="alpha"} 1.0'), 15)
    redis.stop()
    await wait_for(lambda: _metric(a.d, "imsd_fleet_redis_up 0.0"), 15)
    # On its own until Redis answers again, whatever it was: no holder to name, and the
    # lease it may still have is no holder's in the metrics either.
    assert (await _rows(a.d))[0]["fleet"] == {"role": "local", "holder": None}
    assert _metric(a.d, 'imsd_fleet_holder{credential="alpha"} 0.0')


async def test_without_coordination_nothing_changes(
    running: Any, fake: FakeIms, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_cred(tmp_path / "creds", "alpha", fake)
    d = await running()
    await wait_for(lambda: read(d.settings.output_dir / "alpha" / "token"))
    rows = await _rows(d)
    assert rows
    assert all("fleet" not in row for row in rows)
    assert "imsd_fleet" not in d.metrics.render(None)[0].decode()
    assert "adopted" not in d.metrics.render(None)[0].decode()
    code = await anyio.to_thread.run_sync(main, ["status", "--socket", str(d.settings.socket)])
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert next(s for s in out if s.startswith("NAME ")).split() == [
        "NAME",
        "STATE",
        "EXPIRES",
        "LAST",
        "ERROR",
    ]


def test_fleet_series_go_with_their_credential() -> None:
    store = TokenStore()
    metrics = Metrics(store)
    metrics.added("alpha")
    metrics.refreshed("alpha", "success", 0.2)
    text = metrics.render(None)[0].decode()
    assert "imsd_fleet" not in text
    assert "adopted" not in text  # no fleet mode: the four results only
    cred = Credential(
        name="alpha",
        path=Path("/x/alpha.toml"),
        auth="oauth_server_to_server",
        client_id="client-a",
        client_secret=Secret("s"),
        org_id="ORG@AdobeOrg",
        scopes=("openid",),
    )
    store.put(Record("alpha", cred.path, credential=cred))
    metrics.fleet_up(True)  # fleet mode starts: every event from 0, every credential a role
    text = metrics.render(None)[0].decode()
    assert 'imsd_fleet_events_total{event="fenced_out"} 0.0' in text
    assert 'imsd_fleet_holder{credential="alpha"} 0.0' in text
    assert 'imsd_token_refresh_total{credential="alpha",result="adopted"} 0.0' in text
    metrics.fleet_holder("alpha", True)
    metrics.refreshed("alpha", "adopted", 0.0)
    text = metrics.render(None)[0].decode()
    assert 'imsd_fleet_holder{credential="alpha"} 1.0' in text
    assert 'imsd_token_refresh_total{credential="alpha",result="adopted"} 1.0' in text
    assert "imsd_token_refresh_duration_seconds_count 1.0" in text  # an adoption is no request
    store.remove("alpha")
    metrics.forget("alpha")
    assert 'credential="alpha"' not in metrics.render(None)[0].decode()
