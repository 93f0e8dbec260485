"""``imsd.client.HttpxAuth`` (sync and async) and ``RequestsAuth`` as an application uses
them: against a running daemon and the fake IMS gateway, which refuses a revoked token with a
401 the way Adobe's gateways do."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx
import pytest
import requests
from imsd import client
from imsd.client import HttpxAuth, ImsdUnavailable
from imsd.daemon import Daemon
from imsd.fakeims.server import FakeIms

from tests.support import uds, wait_for, write_cred

pytestmark = pytest.mark.anyio

T = TypeVar("T")
API = "/gateway/aep/data/foundation/catalog/datasets"  # checks Bearer, key, org, sandbox


async def blocking(fn: Callable[[], T]) -> T:
    """Sync clients block; the daemon shares this event loop, so call them from a thread."""
    return await anyio.to_thread.run_sync(fn)


async def start(tmp_path: Path, fake: FakeIms, running: Any, **overrides: Any) -> Daemon:
    write_cred(tmp_path / "creds", "alpha", fake, extra='products = ["aep", "generic"]\n')
    d: Daemon = await running(**overrides)
    await wait_for(lambda: (d.settings.output_dir / "alpha" / "token").exists())
    return d


def on_disk(d: Daemon) -> str:
    return (d.settings.output_dir / "alpha" / "token").read_text()


def bearer(r: httpx.Response | requests.Response) -> str:
    return str(r.request.headers["Authorization"]).removeprefix("Bearer ")


async def rotate(d: Daemon) -> str:
    """A forced refresh through the socket (as an operator's ``curl -X POST`` would)."""
    before = on_disk(d)
    async with uds(d) as c:
        assert (await c.post("/v1/credentials/alpha/refresh")).status_code == 200
    assert on_disk(d) != before
    return on_disk(d)


def where(d: Daemon, source: str) -> dict[str, Any]:
    # Files mode still names the socket: that is where a 401's forced refresh goes.
    if source == "files":
        return {"output_dir": d.settings.output_dir, "socket": d.settings.socket}
    return {"socket": d.settings.socket}


@pytest.fixture(params=["httpx", "httpx-async", "requests"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["files", "socket"])
def source(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def make_get(kind: str, d: Daemon, fake: FakeIms, source: str) -> Any:
    """An async ``get()`` that sends one request to the gateway with the auth of *kind*,
    reusing one client (and so one auth object and its cache) across calls."""
    options = where(d, source)
    url = fake.url + API
    if kind == "httpx-async":
        auth: Any = HttpxAuth("alpha", product="aep", **options)
        ac = httpx.AsyncClient(auth=auth, timeout=30)

        async def aget() -> Any:
            return await ac.get(url)

        aget.close = ac.aclose  # type: ignore[attr-defined]
        return aget
    if kind == "httpx":
        sc = httpx.Client(auth=HttpxAuth("alpha", product="aep", **options), timeout=30)

        async def sget() -> Any:
            return await blocking(lambda: sc.get(url))

        async def sclose() -> None:
            await blocking(sc.close)

        sget.close = sclose  # type: ignore[attr-defined]
        return sget
    session = requests.Session()
    session.auth = client.RequestsAuth("alpha", product="aep", **options)

    async def rget() -> Any:
        return await blocking(lambda: session.get(url, timeout=30))

    async def rclose() -> None:
        session.close()

    rget.close = rclose  # type: ignore[attr-defined]
    return rget


async def test_headers_follow_rotation_and_a_401_forces_one_refresh(
    tmp_path: Path,
    fake: FakeIms,
    running: Any,
    kind: str,
    source: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    d = await start(tmp_path, fake, running, min_refresh_interval=0)
    get = await make_get(kind, d, fake, source)
    try:
        r = await get()
        assert r.status_code == 200, r.text
        assert r.json()["x-sandbox-name"] == "prod"
        assert bearer(r) == on_disk(d)
        # The daemon writes a new token: the next request carries it (no 401 on the way).
        old, new = on_disk(d), await rotate(d)
        r = await get()
        # From the socket, the cached (still valid) token is used for a while: see below.
        expected = new if source == "files" else old
        assert (r.status_code, bearer(r), len(r.history)) == (200, expected, 0)
        if source == "socket":
            monkeypatch.setattr(client, "_SOCKET_RECHECK", 0.0)
            r = await get()
            assert (r.status_code, bearer(r)) == (200, new)
        # IMS revokes it: the gateway says 401, the auth forces one refresh and retries.
        fake.state.revoke(new)
        mints = fake.state.request_count("client-a")
        r = await get()
        assert r.status_code == 200, r.text
        assert [h.status_code for h in r.history] == [401]
        if kind == "requests":  # httpx resends the same Request object, updated
            assert bearer(r.history[0]) == new
        assert bearer(r) == on_disk(d) != new
        assert fake.state.request_count("client-a") == mints + 1  # one forced refresh
    finally:
        await get.close()


async def test_no_second_try_without_a_newer_token(
    tmp_path: Path, fake: FakeIms, running: Any, kind: str
) -> None:
    """Within min_refresh_interval the daemon answers a forced refresh with the token it has:
    the same one that got the 401, so the 401 goes back to the caller, sent once."""
    d = await start(tmp_path, fake, running)  # min_refresh_interval: 30 s
    get = await make_get(kind, d, fake, "files")
    try:
        fake.state.revoke(on_disk(d))
        mints = fake.state.request_count("client-a")
        r = await get()
        assert (r.status_code, r.history) == (401, [])
        assert r.json()["error_code"] == "401013"
        assert fake.state.request_count("client-a") == mints
    finally:
        await get.close()


def write_doc(output_dir: Path, token: str) -> None:
    path = output_dir / "alpha" / "token.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "access_token": token,
        "expires_at": "2999-01-01T00:00:00Z",
        "headers": {"generic": {"Authorization": f"Bearer {token}", "x-api-key": "client-a"}},
    }
    tmp = path.with_name(".token.json.tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)


def test_without_a_daemon(tmp_path: Path, fake: FakeIms, caplog: Any) -> None:
    """A 401 whose refresh cannot be asked for comes back as it is (and says why in the log);
    no token at all is ImsdUnavailable, before anything is sent."""
    write_doc(tmp_path, "not-a-token")
    auth = HttpxAuth("alpha", output_dir=tmp_path, socket=tmp_path / "nope.sock")
    with httpx.Client(auth=auth, timeout=30) as c:
        r = c.get(fake.url + "/gateway/generic/some/api")
    assert (r.status_code, r.history) == (401, [])
    assert "the forced refresh failed: imsd is not running" in caplog.text
    assert "not-a-token" not in caplog.text

    async def in_async() -> int:
        async with httpx.AsyncClient(auth=auth, timeout=30) as ac:
            return (await ac.get(fake.url + "/gateway/generic/some/api")).status_code

    assert anyio.run(in_async) == 401
    with pytest.raises(ImsdUnavailable, match="does not exist"):
        httpx.get(fake.url, auth=HttpxAuth("other", output_dir=tmp_path))
    auth2 = client.RequestsAuth("alpha", "aep", output_dir=tmp_path)
    with pytest.raises(ImsdUnavailable, match="no product 'aep'"):
        requests.get(fake.url, auth=auth2, timeout=30)


def test_requests_is_imported_only_for_requests_auth() -> None:
    script = textwrap.dedent(
        """\
        import sys
        from imsd.client import HttpxAuth, headers
        HttpxAuth("alpha")
        assert "requests" not in sys.modules, "imported by imsd.client"
        from imsd.client import RequestsAuth
        assert "requests" in sys.modules
        assert RequestsAuth.__name__ == "RequestsAuth"
        import imsd.client
        try:
            imsd.client.Nothing
        except AttributeError as e:
            print(e)
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=30
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "module 'imsd.client' has no attribute 'Nothing'\n"


def test_the_file_is_read_again_only_when_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[str] = []
    real = client.token_document

    def counting(name: str, **kwargs: Any) -> dict[str, Any]:
        reads.append(name)
        return real(name, **kwargs)

    monkeypatch.setattr(client, "token_document", counting)
    echo = httpx.MockTransport(lambda req: httpx.Response(200, text=req.headers["Authorization"]))
    write_doc(tmp_path, "tok-1")
    with httpx.Client(auth=HttpxAuth("alpha", output_dir=tmp_path), transport=echo) as c:
        assert [c.get("http://api/").text for _ in range(3)] == ["Bearer tok-1"] * 3
        assert len(reads) == 1  # a stat per request, one read
        write_doc(tmp_path, "tok-2")  # as the daemon does: a new file renamed over it
        assert [c.get("http://api/").text for _ in range(2)] == ["Bearer tok-2"] * 2
        assert len(reads) == 2


class _Recorder(http.server.BaseHTTPRequestHandler):
    """A server that records the Authorization headers it is sent; ``redirect`` set: it
    answers 302 there, else 401 (the other host of issue 23 item 7)."""

    seen: list[str | None]
    redirect: str | None = None

    def do_GET(self) -> None:
        self.seen.append(self.headers.get("Authorization"))
        if self.redirect:
            self.send_response(302)
            self.send_header("Location", self.redirect)
        else:
            self.send_response(401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _serve(seen: list[str | None], redirect: str | None) -> http.server.ThreadingHTTPServer:
    handler = type("H", (_Recorder,), {"seen": seen, "redirect": redirect})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


async def test_a_401_after_a_cross_host_redirect_never_sends_the_token_there(
    tmp_path: Path, fake: FakeIms, running: Any, kind: str
) -> None:
    """The app's request to host A is redirected to host B, which answers 401: the retry with a
    fresh token goes to A's URL again (httpx's flow) or not at all, never to B (issue 23 #7:
    RequestsAuth retried the redirected request itself, Bearer token included)."""
    d = await start(tmp_path, fake, running, min_refresh_interval=0)
    other: list[str | None] = []
    b = _serve(other, None)
    mine: list[str | None] = []
    a = _serve(mine, f"http://localhost:{b.server_address[1]}/elsewhere")
    url = f"http://127.0.0.1:{a.server_address[1]}/start"
    options = where(d, "socket")
    try:
        if kind == "requests":
            with requests.Session() as s:
                s.auth = client.RequestsAuth("alpha", product="aep", **options)
                r: Any = await blocking(lambda: s.get(url, timeout=30))
        else:
            auth = HttpxAuth("alpha", product="aep", **options)
            if kind == "httpx":
                with httpx.Client(auth=auth, follow_redirects=True, timeout=30) as c:
                    r = await blocking(lambda: c.get(url))
            else:
                async with httpx.AsyncClient(auth=auth, follow_redirects=True, timeout=30) as ac:
                    r = await ac.get(url)
        assert r.status_code == 401
        assert other  # the redirect was followed...
        assert all(h is None for h in other)  # ...and B never saw a token
        assert mine
        assert all(h and h.startswith("Bearer ") for h in mine)
    finally:
        a.shutdown()
        b.shutdown()
