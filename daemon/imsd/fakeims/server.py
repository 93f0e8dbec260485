"""Running the fake IMS: inside a task group, in a background thread (tests, ``imsd demo``),
or in the foreground (``imsd fake-ims``)."""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Final

import anyio
import anyio.abc
import anyio.from_thread

from imsd.fakeims.app import FakeImsApp
from imsd.fakeims.state import FakeImsState
from imsd.httpserver import HttpServer, bound_port, tcp_listener

__all__ = ["FakeIms", "run_fake_ims"]

DEMO_SCOPES: Final = (
    "openid",
    "AdobeID",
    "read_organizations",
    "additional_info.projectedProductContext",
    "session",
)


class FakeIms:
    def __init__(self, *, token_lifetime: float = 86400.0) -> None:
        self.state = FakeImsState(token_lifetime=token_lifetime)
        self.app = FakeImsApp(self.state)
        self.url = ""

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        listener = await tcp_listener(host, port)
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{bound_port(listener)}"
        try:
            server = HttpServer(self.app.handle, idle_timeout=30.0)
            async with anyio.create_task_group() as tg:
                await tg.start(server.serve, [listener])
                task_status.started(self.url)
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()

    @classmethod
    @contextmanager
    def in_thread(
        cls, host: str = "127.0.0.1", port: int = 0, *, token_lifetime: float = 86400.0
    ) -> Iterator[FakeIms]:
        """Run a fake IMS on its own event loop in a background thread."""
        fake = cls(token_lifetime=token_lifetime)
        with anyio.from_thread.start_blocking_portal() as portal:
            future, _url = portal.start_task(fake.serve, host, port)
            try:
                yield fake
            finally:
                future.cancel()


def run_fake_ims(host: str, port: int) -> None:
    """``imsd fake-ims``: serve until interrupted, with one demo client registered."""
    fake = FakeIms()
    secret = secrets.token_urlsafe(24)
    fake.state.add_client(
        "demo-client",
        secrets=[secret],
        scopes=DEMO_SCOPES,
        org_id="0123456789ABCDEF01234567@AdobeOrg",
    )

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            url = await tg.start(fake.serve, host, port)
            print(
                f"fake IMS listening on {url}\n"
                f"  demo client: client_id=demo-client client_secret={secret}\n"
                f"  (a fake secret for a fake server; register more with POST {url}/_fake/clients)",
                file=sys.stderr,
                flush=True,
            )

    with suppress(KeyboardInterrupt):
        anyio.run(main)
