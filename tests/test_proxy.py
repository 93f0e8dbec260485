"""The authenticating proxy (``[[proxy]]``, README "Proxy"): its pure parts table-tested,
then end to end through a running daemon to the fake gateway's streaming stand-in
(:mod:`imsd.fakeims.bulk`, which applies the gateway's header checks) over real sockets."""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import h11
import httpx
import pytest
from imsd import logs, tcppeer
from imsd.config import ConfigError, ProxySpec, Settings
from imsd.daemon import Daemon
from imsd.fakeims.bulk import BulkApi, pattern
from imsd.fakeims.server import FakeIms
from imsd.httpserver import PeerCred, bound_port, tcp_listener
from imsd.proxy import BadTarget, allowed_peer, request_headers, response_headers, upstream_url
from imsd.registry import load_registry
from imsd.render import validated_options
from pydantic import ValidationError

from tests.support import ORG, live, wait_for, write_cred

pytestmark = pytest.mark.anyio

# -- pure parts --------------------------------------------------------------------------------

BASE = "https://platform.adobe.io/base"


@pytest.mark.parametrize(
    ("target", "url"),
    [
        ("/data/foundation/catalog/datasets", f"{BASE}/data/foundation/catalog/datasets"),
        ("/x?limit=5&start=a", f"{BASE}/x?limit=5&start=a"),
        ("/", f"{BASE}/"),
        ("//evil.example/x", f"{BASE}//evil.example/x"),  # a path, on the base's host
        ("/@evil.example", f"{BASE}/@evil.example"),
        ("/a/...", f"{BASE}/a/..."),  # three dots are a name
        ("/a/..x/b..", f"{BASE}/a/..x/b.."),
        ("/a;v=1/b", f"{BASE}/a;v=1/b"),
        ("/files/a%2Fb", f"{BASE}/files/a%2Fb"),  # an encoded slash alone is data
    ],
)
def test_upstream_url_appends_path_and_query(target: str, url: str) -> None:
    assert upstream_url(BASE, target) == url
    assert httpx.URL(url).host == "platform.adobe.io"


@pytest.mark.parametrize(
    "target",
    [
        "http://evil.example/x",  # absolute form: the client would pick the host
        "evil.example:443",  # authority form (CONNECT)
        "*",
        "/a/../b",
        "/a/%2e%2e/b",
        "/a/./b",
        "/a b",
        "/a\r\nHost: evil",
        "/a#frag",
        "/a\\b",
        # Encoded dot segments, as an upstream that decodes before it resolves reads them
        # (issue 23 Low 14): nginx, IIS, Tomcat's path parameters.
        "/a/..%2fb",
        "/a/%2e%2e%2fb",
        "/a%2F..%2Fb",
        "/a/..;/b",
        "/a/.;x/b",
        "/a/%252e%252e/b",
        "/a%5c..%5cb",
        "/a/.%2E/b",
    ],
)
def test_upstream_url_refuses_targets_that_could_leave_the_instance(target: str) -> None:
    with pytest.raises(BadTarget):
        upstream_url(BASE, target)


def test_request_headers_replace_injected_and_drop_hop_by_hop() -> None:
    client = [
        ("Host", "evil.example"),
        ("Authorization", "Bearer theirs"),
        ("X-Api-Key", "theirs"),
        ("x-gw-ims-org-id", "OTHER@AdobeOrg"),
        ("Connection", "keep-alive, X-Private"),
        ("X-Private", "hop"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Authorization", "Basic x"),
        ("TE", "trailers"),
        ("Transfer-Encoding", "chunked"),
        ("Upgrade", "h2c"),
        ("Expect", "100-continue"),
        ("Content-Type", "application/json"),
        ("Content-Length", "12"),
        ("Accept", "application/json"),
    ]
    injected = {"Authorization": "Bearer ours", "x-api-key": "ours", "x-gw-ims-org-id": ORG}
    out = request_headers(client, injected)
    assert out == [
        ("Content-Type", "application/json"),
        ("Content-Length", "12"),
        ("Accept", "application/json"),
        ("Authorization", "Bearer ours"),
        ("x-api-key", "ours"),
        ("x-gw-ims-org-id", ORG),
    ]


def test_response_headers_drop_hop_by_hop() -> None:
    upstream = [
        ("content-type", "application/json"),
        ("connection", "close, x-hop"),
        ("x-hop", "1"),
        ("transfer-encoding", "chunked"),
        ("x-request-id", "abc"),
        ("content-length", "3"),
    ]
    assert response_headers(upstream) == [
        ("content-type", "application/json"),
        ("x-request-id", "abc"),
        ("content-length", "3"),
    ]


def test_peer_rule_is_the_socket_apis() -> None:
    me = PeerCred(pid=1, uid=1000, gid=1000, groups=(27,))
    assert allowed_peer(me, {1000}, set())
    assert allowed_peer(me, set(), {27})
    assert not allowed_peer(me, {0}, {5})
    assert not allowed_peer(None, {1000}, {1000})


def test_tcp_listeners_are_loopback_unless_allowed() -> None:
    spec = {"credential": "aep", "product": "aep"}
    assert ProxySpec(listen="127.0.0.1:8080", **spec).tcp
    assert ProxySpec(listen="[::1]:8080", **spec).host == "::1"
    assert not ProxySpec(listen="/run/imsd/aep.sock", **spec).tcp
    with pytest.raises(ValidationError, match="loopback"):
        ProxySpec(listen="0.0.0.0:8080", **spec)
    assert ProxySpec(listen="0.0.0.0:8080", allow_remote=True, **spec).host == "0.0.0.0"
    with pytest.raises(ValidationError):
        ProxySpec(listen="8080", **spec)


# -- end to end ---------------------------------------------------------------------------------


@pytest.fixture
async def bulk(fake: FakeIms) -> AsyncIterator[BulkApi]:
    api = BulkApi(fake.state)
    async with anyio.create_task_group() as tg:
        await tg.start(api.serve)
        yield api
        tg.cancel_scope.cancel()


async def proxied(
    tmp_path: Path,
    fake: FakeIms,
    bulk: BulkApi,
    running: Any,
    base_url: str | None = None,
    settings: dict[str, Any] | None = None,
    **spec: Any,
) -> tuple[Daemon, str]:
    """A daemon with the credential ``aep`` (instance ``aep-dev`` in sandbox ``dev``, its base
    URL the fake's aep gateway unless *base_url*; the daemon's *settings* besides) and one
    proxy to it; the proxy's address."""
    base_url = base_url or f"{bulk.url}/gateway/aep/"
    write_cred(
        tmp_path / "creds",
        "aep",
        fake,
        extra=(
            'products = ["aep-dev"]\n[product.aep-dev]\ntype = "aep"\nsandbox = "dev"\n'
            f'base_url = "{base_url}"\n'
        ),
    )
    listen = spec.pop("listen", "127.0.0.1:0")
    options = {"listen": listen, "credential": "aep", "product": "aep-dev", **spec}
    d = await running(proxy=[ProxySpec(**options)], min_refresh_interval=0.0, **(settings or {}))
    await wait_for(lambda: live(d, "aep").grant is not None)
    return d, d.proxies[0][1]


async def test_requests_reach_the_instance_with_its_headers(
    tmp_path: Path, fake: FakeIms, bulk: BulkApi, running: Any
) -> None:
    d, address = await proxied(tmp_path, fake, bulk, running)
    async with httpx.AsyncClient(base_url=f"http://{address}", timeout=30) as c:
        # The gateway's own checks pass: token, API key, org, sandbox.
        r = await c.get("/data/foundation/catalog/datasets")
        assert r.status_code == 200, r.text
        assert r.json()["x-sandbox-name"] == "dev"
        # The client's values for injected headers are replaced, never merged.
        r = await c.get(
            "/_fake/headers",
            headers={
                "Authorization": "Bearer stolen",
                "x-sandbox-name": "prod",
                "x-gw-ims-org-id": "OTHER@AdobeOrg",
                "Connection": "x-private",
                "X-Private": "hop",
                "X-Mine": "kept",
            },
        )
        assert r.status_code == 200, r.text
        seen: dict[str, list[str]] = {}
        for k, v in r.json():
            seen.setdefault(k, []).append(v)
        token = live(d, "aep").grant.access_token.reveal()
        assert seen["authorization"] == [f"Bearer {token}"]
        assert seen["x-api-key"] == ["client-a"]
        assert seen["x-gw-ims-org-id"] == [ORG]
        assert seen["x-sandbox-name"] == ["dev"]
        assert seen["x-mine"] == ["kept"]
        assert "x-private" not in seen
        assert seen["host"] == [bulk.url.removeprefix("http://")]
        # No open proxy: an absolute target is refused, whatever its host.
        r = await c.get("/x", extensions={"target": b"http://evil.example/x"})
        assert r.status_code == 400
    scrape = (await d.metrics.scrape(None))[0].decode()
    assert 'imsd_proxy_requests_total{instance="aep-dev",status="200"} 2.0' in scrape
    assert 'imsd_proxy_requests_total{instance="aep-dev",status="400"} 1.0' in scrape
    assert 'imsd_proxy_upstream_seconds_count{instance="aep-dev"} 2.0' in scrape


async def test_a_401_forces_one_refresh_and_one_retry(
    tmp_path: Path, fake: FakeIms, bulk: BulkApi, running: Any
) -> None:
    d, address = await proxied(tmp_path, fake, bulk, running)
    old = live(d, "aep").grant
    fake.state.revoke(old.access_token.reveal())  # IMS revoked it: the gateway answers 401
    async with httpx.AsyncClient(base_url=f"http://{address}", timeout=30) as c:
        r = await c.get("/data/foundation/catalog/datasets")
        assert r.status_code == 200, r.text
        assert live(d, "aep").grant is not old
        # A request with a body is never replayed: its 401 goes back as it came.
        fake.state.revoke(live(d, "aep").grant.access_token.reveal())
        r = await c.post("/_fake/upload", content=b"x" * 10)
        assert r.status_code == 401
        assert r.json()["error_code"] == "401013"
    paths = [(m, s) for m, p, s in bulk.requests if p.endswith("/datasets")]
    assert paths == [("GET", "401"), ("GET", "200")]


async def test_a_hung_upstream_answers_504(
    tmp_path: Path, fake: FakeIms, bulk: BulkApi, running: Any
) -> None:
    _, address = await proxied(tmp_path, fake, bulk, running, timeout=0.5)
    async with httpx.AsyncClient(base_url=f"http://{address}", timeout=30) as c:
        r = await c.get("/_fake/hang")
        assert r.status_code == 504
        assert (await c.get("/data/foundation/catalog/datasets")).status_code == 200


async def test_no_usable_token_answers_503(
    tmp_path: Path, fake: FakeIms, bulk: BulkApi, running: Any
) -> None:
    _, address = await proxied(tmp_path, fake, bulk, running, credential="ghost")
    async with httpx.AsyncClient(base_url=f"http://{address}", timeout=30) as c:
        r = await c.get("/data/foundation/catalog/datasets")
    assert r.status_code == 503
    assert r.json()["error"] == "unknown_credential"
    assert r.headers["retry-after"] == "5"
    assert bulk.requests == []  # nothing went upstream


async def test_unix_socket_proxy_checks_peers(
    tmp_path: Path, fake: FakeIms, bulk: BulkApi, running: Any
) -> None:
    path = tmp_path / "aep.sock"
    d, address = await proxied(tmp_path, fake, bulk, running, listen=str(path))
    transport = httpx.AsyncHTTPTransport(uds=address)
    async with httpx.AsyncClient(transport=transport, base_url="http://aep", timeout=30) as c:
        assert (await c.get("/data/foundation/catalog/datasets")).status_code == 200
        api = d._api
        assert api is not None
        api.set_access(allowed_uids=[65534], allowed_gids=[], min_refresh_interval=0)
        r = await c.get("/data/foundation/catalog/datasets")
        assert r.status_code == 403
        assert r.json()["error"] == "forbidden"


# -- who may drive it: web pages (issue 23 High 2, Low 13 and 15) ----------------------------


def _upstream_saw(bulk: BulkApi, suffix: str) -> bool:
    return any(p.endswith(suffix) for _, p, _ in bulk.requests)


async def test_a_dns_rebinding_page_gets_no_signed_request(
    tmp_path: Path, fake: FakeIms, bulk: BulkApi, running: Any
) -> None:
    _, address = await proxied(tmp_path, fake, bulk, running)
    port = address.rsplit(":", 1)[1]
    async with httpx.AsyncClient(base_url=f"http://{address}", timeout=30) as c:
        # What the browser sends once attacker.example resolves to 127.0.0.1: its own name.
        r = await c.get("/_fake/headers", headers={"Host": f"attacker.example:{port}"})
        assert (r.status_code, r.json()["error"]) == (403, "host_not_allowed")
        assert "Bearer" not in r.text
        assert not _upstream_saw(bulk, "/_fake/headers")
        for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
            r = await c.get("/_fake/headers", headers={"Host": host})
            assert r.status_code == 200, r.text


async def test_cross_site_requests_from_pages_are_refused_unless_their_origin_is_allowed(
    tmp_path: Path, fake: FakeIms, bulk: BulkApi, running: Any
) -> None:
    d, address = await proxied(
        tmp_path, fake, bulk, running, allowed_origins=("http://localhost:3000",)
    )
    # A "simple" request: no preflight, so only the proxy can stop it.
    simple = {"Content-Type": "text/plain"}
    async with httpx.AsyncClient(base_url=f"http://{address}", timeout=30) as c:
        pages = [
            {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
            {"Origin": "http://127.0.0.1:9999", "Sec-Fetch-Site": "same-site"},
            {"Sec-Fetch-Site": "cross-site"},  # a form's top-level navigation
            {"Origin": "null"},  # a sandboxed frame, a file:// page
        ]
        for page in pages:
            r = await c.post("/_fake/upload", content=b"x", headers={**simple, **page})
            assert (r.status_code, r.json()["error"]) == (403, "origin_not_allowed"), page
        assert not _upstream_saw(bulk, "/_fake/upload")
        page = {"Origin": "http://localhost:3000", "Sec-Fetch-Site": "same-site"}
        r = await c.post("/_fake/upload", content=b"x", headers={**simple, **page})
        assert r.status_code == 200, r.text
    labels = {"instance": "aep-dev", "status": "403"}
    assert d.metrics.registry.get_sample_value("imsd_proxy_requests_total", labels) == 4


async def test_trace_is_never_forwarded(
    tmp_path: Path, fake: FakeIms, bulk: BulkApi, running: Any
) -> None:
    _, address = await proxied(tmp_path, fake, bulk, running)
    async with httpx.AsyncClient(base_url=f"http://{address}", timeout=30) as c:
        for method in ("TRACE", "TRACK"):
            r = await c.request(method, "/_fake/headers")
            assert (r.status_code, r.json()["error"]) == (405, "method_not_allowed")
            assert "TRACE" not in r.headers["allow"]
    assert bulk.requests == []


async def test_refused_requests_are_logged_once_a_minute_per_reason(
    tmp_path: Path, fake: FakeIms, bulk: BulkApi, running: Any
) -> None:
    stream = io.StringIO()
    logs.configure("info", "json", stream)
    try:
        d, address = await proxied(tmp_path, fake, bulk, running)
        async with httpx.AsyncClient(base_url=f"http://{address}", timeout=30) as c:
            for _ in range(150):
                r = await c.get("/x", headers={"Host": "attacker.example"})
                assert r.status_code == 403
                r = await c.get("/x", headers={"Origin": "https://evil.example"})
                assert r.status_code == 403
    finally:
        logs.configure("warning", "json")
    lines = [x for x in stream.getvalue().splitlines() if "proxy.request_refused" in x]
    assert len(lines) == 2, lines  # one per reason, not 300
    assert {json.loads(x)["reason"] for x in lines} == {"host_not_allowed", "origin_not_allowed"}
    labels = {"instance": "aep-dev", "status": "403"}
    assert d.metrics.registry.get_sample_value("imsd_proxy_requests_total", labels) == 300


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_tcp_proxy_checks_the_peers_user(
    tmp_path: Path, fake: FakeIms, bulk: BulkApi, running: Any, host: str
) -> None:
    """A TCP listener applies the socket API's allowed_uids/gids to the owner of the client's
    socket (tests/test_attacks.py does it as a second real user)."""
    d, address = await proxied(tmp_path, fake, bulk, running, listen=f"[{host}]:0")
    port = address.rsplit(":", 1)[1]
    url = f"http://{'[::1]' if ':' in host else host}:{port}"
    api = d._api
    assert api is not None
    for uids, gids, status in (
        ([os.getuid()], [], 200),
        ([65534], [], 403),  # this process's user is no longer allowed
        ([65534], [os.getgid()], 200),  # its group is
    ):
        api.set_access(allowed_uids=uids, allowed_gids=gids, min_refresh_interval=0)
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            r = await c.get("/data/foundation/catalog/datasets")
        assert r.status_code == status, r.text
        if status == 403:
            assert r.json()["error"] == "forbidden"


async def test_peer_check_without_the_kernel_table_is_a_config_error(
    tmp_path: Path, running: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not Linux (or /proc hidden): the daemon cannot tell who connects, so it refuses to
    start the listener rather than serve every local user."""
    monkeypatch.setitem(tcppeer.TABLES, 4, tmp_path / "no-such-table")
    spec = ProxySpec(listen="127.0.0.1:0", credential="aep", product="aep-dev")
    want = pytest.RaisesExc(ConfigError, match="no-such-table.*set peer_check = false")
    with pytest.RaisesGroup(want, flatten_subgroups=True):
        await running(proxy=[spec])


async def test_a_client_gone_mid_body_leaves_nothing_behind(
    tmp_path: Path, fake: FakeIms, bulk: BulkApi, running: Any
) -> None:
    d, address = await proxied(tmp_path, fake, bulk, running)
    host, port = address.rsplit(":", 1)
    stream = await anyio.connect_tcp(host, int(port))
    head = b"POST /_fake/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000\r\n\r\n"
    await stream.send(head + b"x" * 200_000)
    await wait_for(lambda: ("POST", "/gateway/aep/_fake/upload", "started") in bulk.requests)
    await stream.aclose()
    # The upstream sees its request end short, not complete: nothing half-sent passes as whole.
    await wait_for(lambda: ("POST", "/gateway/aep/_fake/upload", "aborted") in bulk.requests)
    labels = {"instance": "aep-dev", "status": "client_gone"}
    await wait_for(
        lambda: d.metrics.registry.get_sample_value("imsd_proxy_requests_total", labels) == 1
    )
    proxy = d.proxies[0][0]
    await wait_for(lambda: proxy.connections == 0)
    # Gone mid-download: the upstream connection is dropped with it.
    stream = await anyio.connect_tcp(host, int(port))
    await stream.send(b"GET /_fake/download?size=50000000 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert (await stream.receive()).startswith(b"HTTP/1.1 200 ")
    await stream.aclose()
    await wait_for(lambda: proxy.connections == 0)
    async with httpx.AsyncClient(base_url=f"http://{address}", timeout=30) as c:
        assert (await c.get("/data/foundation/catalog/datasets")).status_code == 200


# -- the upstream pool ----------------------------------------------------------------------

_BIG = 8 * 1024 * 1024


class _Upstream:
    """A TCP upstream on a free loopback port that counts its connections (``accepted``,
    ``open``); a subclass's ``_talk`` holds one connection's conversation."""

    def __init__(self) -> None:
        self.url = ""
        self.accepted = 0
        self.open = 0

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        listener = await tcp_listener("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{bound_port(listener)}"
        async with listener:
            task_status.started()
            await listener.serve(self._connection)

    async def _connection(self, stream: anyio.abc.ByteStream) -> None:
        self.accepted += 1
        self.open += 1
        try:
            async with stream:
                await self._talk(stream)
        except (anyio.EndOfStream, anyio.BrokenResourceError, h11.ProtocolError, OSError):
            pass  # the proxy went away or was refused: what the tests look at is counted
        finally:
            self.open -= 1

    async def _talk(self, stream: anyio.abc.ByteStream) -> None:
        raise NotImplementedError


@contextlib.asynccontextmanager
async def _serving(server: _Upstream) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        yield
        tg.cancel_scope.cancel()


class _Origin(_Upstream):
    """A bare upstream that counts its connections: ``/big`` answers 8 MB, anything else two
    bytes, all with keep-alive. *mode* ``drop`` closes a connection at its second request
    without answering (a server timing out an idle connection just as a request comes: the
    proxy's pool still held it for open); ``close_idle`` closes it after each answer."""

    def __init__(self, mode: str = "") -> None:
        super().__init__()
        self.mode = mode
        self.requests: list[str] = []

    async def _talk(self, stream: anyio.abc.ByteStream) -> None:
        conn = h11.Connection(h11.SERVER)
        for served in range(1_000_000):
            req = await self._event(conn, stream)
            if not isinstance(req, h11.Request):
                return
            self.requests.append(f"{req.method.decode()} {req.target.decode()}")
            while not isinstance(await self._event(conn, stream), h11.EndOfMessage):
                pass
            if self.mode == "drop" and served:
                return
            size = _BIG if req.target == b"/big" else 2
            head = [("Content-Length", str(size))]
            await stream.send(conn.send(h11.Response(status_code=200, headers=head)))
            for at in range(0, size, 65536):
                data = pattern(min(65536, size - at))
                await stream.send(conn.send(h11.Data(data=data)))
            await stream.send(conn.send(h11.EndOfMessage()))
            if self.mode == "close_idle":
                return
            conn.start_next_cycle()

    @staticmethod
    async def _event(conn: h11.Connection, stream: anyio.abc.ByteStream) -> Any:
        while (event := conn.next_event()) is h11.NEED_DATA:
            try:
                conn.receive_data(await stream.receive())
            except anyio.EndOfStream:
                conn.receive_data(b"")
        return event


@pytest.fixture
async def origin(request: pytest.FixtureRequest) -> AsyncIterator[_Origin]:
    server = _Origin(getattr(request, "param", ""))
    async with _serving(server):
        yield server


async def test_upstream_connections_are_reused(
    tmp_path: Path, fake: FakeIms, bulk: BulkApi, running: Any, origin: _Origin
) -> None:
    _, address = await proxied(tmp_path, fake, bulk, running, base_url=origin.url)
    async with httpx.AsyncClient(base_url=f"http://{address}", timeout=30) as c:
        for _ in range(5):
            assert (await c.get("/small")).content == pattern(2)
        assert (await c.post("/up", content=b"x" * 100_000)).status_code == 200
        assert (await c.get("/small")).status_code == 200
    assert origin.accepted == 1
    assert len(origin.requests) == 7


@pytest.mark.parametrize("origin", ["drop", "close_idle"], indirect=True)
async def test_a_pooled_connection_the_upstream_closed_is_retried_for_a_get(
    tmp_path: Path, fake: FakeIms, bulk: BulkApi, running: Any, origin: _Origin
) -> None:
    _, address = await proxied(tmp_path, fake, bulk, running, base_url=origin.url)
    async with httpx.AsyncClient(base_url=f"http://{address}", timeout=30) as c:
        assert (await c.get("/one")).status_code == 200
        await wait_for(lambda: origin.mode == "drop" or origin.open == 0)
        # The pooled connection is dead (closed while idle, or at the request itself):
        # the client never learns, the request goes once more on a new connection.
        assert (await c.get("/two")).content == pattern(2)
        assert origin.accepted == 2
        if origin.mode == "drop":
            assert origin.requests == ["GET /one", "GET /two", "GET /two"]
            # A request with a body is never sent twice: its bytes were streamed, not kept.
            r = await c.post("/up", content=b"x" * 10)
            assert r.status_code == 502
            assert r.json()["error"] == "upstream_error"
            assert origin.requests.count("POST /up") == 1


async def test_a_response_not_read_to_its_end_is_never_pooled(
    tmp_path: Path, fake: FakeIms, bulk: BulkApi, running: Any, origin: _Origin
) -> None:
    d, address = await proxied(tmp_path, fake, bulk, running, base_url=origin.url)
    host, port = address.rsplit(":", 1)
    stream = await anyio.connect_tcp(host, int(port))
    await stream.send(b"GET /big HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert (await stream.receive()).startswith(b"HTTP/1.1 200 ")
    await stream.aclose()
    # The client left mid-body: the upstream connection is closed, not kept half read.
    await wait_for(lambda: origin.open == 0)
    await wait_for(lambda: d.proxies[0][0].connections == 0)
    async with httpx.AsyncClient(base_url=f"http://{address}", timeout=30) as c:
        assert (await c.get("/small")).content == pattern(2)
    assert origin.accepted == 2


async def test_pooled_connections_close_when_the_proxy_stops(
    tmp_path: Path, fake: FakeIms, bulk: BulkApi, running: Any, origin: _Origin
) -> None:
    d, address = await proxied(tmp_path, fake, bulk, running, base_url=origin.url)
    async with httpx.AsyncClient(base_url=f"http://{address}", timeout=30) as c:
        assert (await c.get("/small")).status_code == 200
    assert origin.open == 1  # kept for the next request
    await d.stop(grace=1)
    await wait_for(lambda: origin.open == 0)


# -- 100 MB each way --------------------------------------------------------------------------

_SIZE = 100 * 1024 * 1024
_RSS_BOUND = 48 * 1024 * 1024  # a third of what buffering the body once would cost


def _rss() -> int:
    for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class _Peak:
    """The highest VmRSS seen while the body moves (the daemon, the fake API and the client
    share this process: none of them may hold the body)."""

    def __init__(self) -> None:
        self.base = _rss()
        self.peak = self.base

    def sample(self) -> None:
        self.peak = max(self.peak, _rss())


async def _chunks(peak: _Peak) -> AsyncIterator[bytes]:
    block = pattern(1 << 20)
    for _ in range(_SIZE >> 20):
        peak.sample()
        yield block


@pytest.mark.long
async def test_100_mb_streamed_up_and_down_with_bounded_rss(
    tmp_path: Path, fake: FakeIms, bulk: BulkApi, running: Any
) -> None:
    _, address = await proxied(tmp_path, fake, bulk, running)
    async with httpx.AsyncClient(base_url=f"http://{address}", timeout=60) as c:
        peak = _Peak()
        up = await c.post(
            "/_fake/upload",
            content=_chunks(peak),
            headers={"Content-Length": str(_SIZE)},
        )
        assert up.status_code == 200, up.text
        expected = hashlib.sha256()
        block = pattern(1 << 20)
        for _ in range(_SIZE >> 20):
            expected.update(block)
        assert up.json() == {"bytes": _SIZE, "sha256": expected.hexdigest()}
        assert peak.peak - peak.base < _RSS_BOUND, (peak.peak - peak.base) >> 20

        peak = _Peak()
        got, digest = 0, hashlib.sha256()
        async with c.stream("GET", f"/_fake/download?size={_SIZE}") as r:
            assert r.status_code == 200
            assert r.headers["content-length"] == str(_SIZE)
            async for chunk in r.aiter_raw():
                got += len(chunk)
                digest.update(chunk)
                peak.sample()
        assert got == _SIZE
        assert digest.hexdigest() == expected.hexdigest()
        assert peak.peak - peak.base < _RSS_BOUND, (peak.peak - peak.base) >> 20


def test_settings_accept_proxy_tables(tmp_path: Path) -> None:
    s = Settings.model_validate(
        {"proxy": [{"listen": "127.0.0.1:8080", "credential": "aep", "product": "aep-dev"}]}
    )
    assert s.proxy[0].product == "aep-dev"


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://platform-eu.adobe.io", True),
        ("http://127.0.0.1:8080/gateway/aep", True),
        ("http://localhost/x", True),
        ("http://platform.adobe.io", False),  # clear text off the machine
        ("ftp://platform.adobe.io", False),
        ("https://a b", False),
        (42, False),
    ],
)
def test_every_product_takes_a_base_url_override(url: object, ok: bool) -> None:
    """``base_url`` is the core's option: checked here, never shown to the product's own
    validation (which refuses unknown options), and it wins over the product's URL."""
    products = load_registry().products
    for name, own in (("aep", {}), ("cja", {}), ("campaign", {"tenant": "acme"})):
        product = products[name]
        if not ok:
            with pytest.raises(ValueError, match="base_url"):
                validated_options(product, {**own, "base_url": url})
            continue
        checked = validated_options(product, {**own, "base_url": f"{url}/"})
        assert checked["base_url"] == url


# -- a hostile upstream -------------------------------------------------------------------------

_GOOD = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class _Hostile(_Upstream):
    """A raw-socket upstream: ``/good`` gets a well-formed keep-alive answer, any other target
    ``answer`` as bytes; the connection stays open for the next request until the proxy
    closes it. With *drip*, the answer is followed by *drip* repeated for ever, a byte every
    20 ms (a slow-loris upstream)."""

    def __init__(self, answer: bytes, drip: bytes = b"") -> None:
        super().__init__()
        self.answer, self.drip = answer, drip
        self.heads: list[bytes] = []

    async def _talk(self, stream: anyio.abc.ByteStream) -> None:
        buffered = b""
        while True:
            while b"\r\n\r\n" not in buffered:
                buffered += await stream.receive()
            head, _, buffered = buffered.partition(b"\r\n\r\n")
            self.heads.append(head)
            if head.split(b" ", 2)[1] == b"/good":
                await stream.send(_GOOD)
                continue
            await stream.send(self.answer)
            for byte in itertools.cycle(self.drip):
                await anyio.sleep(0.02)
                await stream.send(bytes([byte]))


@pytest.fixture
async def hostile(request: pytest.FixtureRequest) -> AsyncIterator[_Hostile]:
    param = request.param
    server = _Hostile(*param) if isinstance(param, tuple) else _Hostile(param)
    async with _serving(server):
        yield server


_HOSTILE = {
    "cl_and_te": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n0\r\n\r\n",
    "te_and_cl": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n"
    b"3\r\nabc\r\n0\r\n\r\n",
    "two_lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
    "switching": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
    "not_http": b"HELLO\r\n\r\n",
    "te_gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc",
}


@pytest.mark.parametrize("hostile", list(_HOSTILE.values()), ids=list(_HOSTILE), indirect=True)
async def test_a_malformed_upstream_answer_fails_that_request_only(
    tmp_path: Path, fake: FakeIms, bulk: BulkApi, running: Any, hostile: _Hostile
) -> None:
    d, address = await proxied(tmp_path, fake, bulk, running, base_url=hostile.url)
    async with httpx.AsyncClient(base_url=f"http://{address}", timeout=30) as c:
        r = await c.get("/evil")
        assert r.status_code == 502, r.text
        assert r.json()["error"] == "upstream_error"
        await wait_for(lambda: hostile.open == 0)  # discarded, never pooled
        assert (await c.get("/good")).content == b"ok"
    assert hostile.accepted == 2
    labels = {"instance": "aep-dev", "status": "upstream_error"}
    assert d.metrics.registry.get_sample_value("imsd_proxy_requests_total", labels) == 1


_ODD = b"HTTP/1.1 200 \xe9t\xe9\r\nX-Odd: caf\xe9\r\nContent-Length: 2\r\n\r\nhi"


@pytest.mark.parametrize("hostile", [_ODD], ids=["8-bit"], indirect=True)
async def test_8_bit_header_values_pass_both_ways(
    tmp_path: Path, fake: FakeIms, bulk: BulkApi, running: Any, hostile: _Hostile
) -> None:
    """obs-text (RFC 9110 section 5.5) in a header value or reason is legal on the wire;
    h11 would encode a str as ASCII: the bytes pass as they came, whichever side sent them."""
    _, address = await proxied(tmp_path, fake, bulk, running, base_url=hostile.url)
    host, port = address.rsplit(":", 1)
    stream = await anyio.connect_tcp(host, int(port))
    await stream.send(b"GET /odd HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Mine: na\xefve\r\n\r\n")
    answer = b""
    while not answer.endswith(b"hi"):
        answer += await stream.receive()
    assert answer.startswith(b"HTTP/1.1 200 \xe9t\xe9\r\n")
    assert b"\r\nx-odd: caf\xe9\r\n" in answer.lower()
    await stream.aclose()
    async with httpx.AsyncClient(base_url=f"http://{address}", timeout=30) as c:
        assert (await c.get("/good")).content == b"ok"
    assert b"\r\nx-mine: na\xefve" in hostile.heads[0].lower()
    assert hostile.accepted == 1  # a clean exchange: the connection was pooled and reused


_DRIPS = {
    "endless_100": (b"", b"HTTP/1.1 100 Continue\r\n\r\n"),
    "dripped_head": (b"HTTP/1.1 200 OK\r\n", b"X-Drip: 1\r\n"),
}


@pytest.mark.parametrize("hostile", list(_DRIPS.values()), ids=list(_DRIPS), indirect=True)
async def test_an_answer_head_must_arrive_within_the_timeout(
    tmp_path: Path, fake: FakeIms, bulk: BulkApi, running: Any, hostile: _Hostile
) -> None:
    """Bytes keep coming, so no read waits *timeout*: the head as a whole has a deadline."""
    _, address = await proxied(tmp_path, fake, bulk, running, base_url=hostile.url, timeout=0.5)
    async with httpx.AsyncClient(base_url=f"http://{address}", timeout=10) as c:
        r = await c.get("/slow")
        assert r.status_code == 504, r.text
        assert r.json()["error"] == "upstream_timeout"
        await wait_for(lambda: hostile.open == 0)  # dropped, never pooled
        assert (await c.get("/good")).content == b"ok"


# -- connection slots (issue 23 #9) -------------------------------------------------------------


async def test_a_client_that_does_not_take_its_answer_frees_its_slot_and_upstream(
    tmp_path: Path, fake: FakeIms, bulk: BulkApi, running: Any
) -> None:
    """A client that asks for 50 MB and never reads: once the socket buffers are full, the
    write to it must be taken within ``take_timeout``, or the connection is closed and the
    upstream connection with it."""
    d, address = await proxied(tmp_path, fake, bulk, running)
    proxy = d.proxies[0][0]
    proxy.take_timeout = 1.0
    host, port = address.rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    try:
        sock.sendall(b"GET /_fake/download?size=50000000 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await wait_for(lambda: bulk.connections == 1 and proxy.connections == 1)
        await wait_for(lambda: proxy.connections == 0, limit=15)
        await wait_for(lambda: bulk.connections == 0)
    finally:
        sock.close()


async def test_idle_connections_are_shed_for_newcomers(
    tmp_path: Path, fake: FakeIms, bulk: BulkApi, running: Any
) -> None:
    """One user fills every slot with idle connections (connected, nothing sent): each
    legitimate newcomer sheds the one idle the longest instead of being closed."""
    d, address = await proxied(tmp_path, fake, bulk, running, settings={"max_connections": 32})
    proxy = d.proxies[0][0]
    host, port = address.rsplit(":", 1)
    idle = [await anyio.connect_tcp(host, int(port)) for _ in range(50)]
    try:
        await wait_for(lambda: proxy.connections == 32)
        ok = 0
        for _ in range(20):  # a new connection each
            async with httpx.AsyncClient(base_url=f"http://{address}", timeout=10) as c:
                with contextlib.suppress(httpx.HTTPError):
                    r = await c.get("/data/foundation/catalog/datasets")
                    ok += r.status_code == 200
        assert ok == 20
        labels = {"listener": "proxy:aep-dev", "event": "shed"}
        shed = d.metrics.registry.get_sample_value("imsd_http_connection_events_total", labels)
        assert shed is not None
        assert shed >= 50 - 32  # the flood's own newcomers shed too
    finally:
        for s in idle:
            await s.aclose()
