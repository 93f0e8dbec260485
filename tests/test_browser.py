"""A real web browser beside the TCP proxy (issue 23 High 2): headless Chromium, as a user's
desktop browser would be, shown hostile pages while a proxy listens on loopback.

- DNS rebinding: Chromium resolves ``attacker.example`` to 127.0.0.1 (``--host-resolver-rules``
  stands in for the attacker's DNS answer after the rebind) and loads the proxy's port under
  that name: whatever the page shows, its scripts may read.
- A cross-site "simple" POST: a page on another origin sends ``fetch(..., {mode: "no-cors"})``
  with a ``text/plain`` body, which browsers send without a preflight.

Either must never reach the upstream signed. Chromium's own headers are what the proxy sees.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import pytest
from imsd.fakeims.bulk import BulkApi
from imsd.fakeims.server import FakeIms

from tests.requirements import need_tool
from tests.support import live
from tests.test_proxy import bulk, proxied

__all__ = ["bulk"]  # the fixture, used by name

pytestmark = pytest.mark.anyio

_FLAGS = (
    "--headless",
    "--no-sandbox",  # as root, in CI
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
)

_profiles = itertools.count()


async def _chromium(tmp_path: Path, url: str, *, resolve: str) -> str:
    """The DOM of *url* after its scripts ran (up to 5 s of the page's virtual time)."""
    exe = need_tool("chromium", "apt-get install chromium")
    profile = tmp_path / f"profile-{next(_profiles)}"
    cmd = [
        exe,
        *_FLAGS,
        f"--user-data-dir={profile}",
        f"--host-resolver-rules=MAP {resolve} 127.0.0.1",
        "--virtual-time-budget=5000",
        "--dump-dom",
        url,
    ]
    with anyio.fail_after(60):
        done = await anyio.run_process(cmd, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done.stdout.decode(errors="replace")


@contextlib.contextmanager
def _page_server(html: str) -> Iterator[int]:
    """A web server of the attacker's, on loopback: every path answers *html*."""

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


async def test_a_rebinding_page_in_chromium_reads_no_signed_answer(
    tmp_path: Path, fake: FakeIms, bulk: BulkApi, running: Any
) -> None:
    d, address = await proxied(tmp_path, fake, bulk, running)
    port = address.rsplit(":", 1)[1]
    dom = await _chromium(
        tmp_path, f"http://attacker.example:{port}/_fake/headers", resolve="attacker.example"
    )
    token = live(d, "aep").grant.access_token.reveal()
    assert token not in dom
    assert "host_not_allowed" in dom, dom[:2000]
    assert _refused(d) >= 1  # Chromium asked (a favicon too, perhaps): refused
    assert not any(p.endswith("/_fake/headers") for _, p, _ in bulk.requests)
    # The same browser, at the proxy's own address, is a user's choice: it is answered.
    dom = await _chromium(tmp_path, f"http://127.0.0.1:{port}/_fake/headers", resolve="x.invalid")
    assert token in dom


async def test_a_cross_site_page_in_chromium_gets_no_request_signed(
    tmp_path: Path, fake: FakeIms, bulk: BulkApi, running: Any
) -> None:
    d, address = await proxied(tmp_path, fake, bulk, running)
    script = f"""<!doctype html><title>page</title><script>
      fetch("http://{address}/_fake/upload", {{
        method: "POST", mode: "no-cors", body: "transfer=all",
        headers: {{"Content-Type": "text/plain"}}
      }}).then(() => document.title = "sent", e => document.title = "failed " + e);
    </script>"""
    with _page_server(script) as page_port:
        for origin in (f"http://evil.example:{page_port}/", f"http://127.0.0.1:{page_port}/"):
            dom = await _chromium(tmp_path, origin, resolve="evil.example")
            assert "<title>sent</title>" in dom or "failed" in dom, dom[:2000]
    # Chromium sent both (no preflight for a simple request): the proxy saw and refused them;
    # neither was signed and sent on.
    assert _refused(d) == 2
    assert not any(p.endswith("/_fake/upload") for _, p, _ in bulk.requests), bulk.requests


def _refused(d: Any) -> float:
    labels = {"instance": "aep-dev", "status": "403"}
    return d.metrics.registry.get_sample_value("imsd_proxy_requests_total", labels) or 0.0
