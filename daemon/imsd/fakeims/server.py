"""Running the fake IMS: inside a task group, in a background thread (tests, ``imsd demo``),
or in the foreground (``imsd fake-ims``)."""

from __future__ import annotations

import re
import secrets
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any, Final, cast

import anyio
import anyio.abc
import anyio.from_thread

from imsd.fakeims.app import DRIP_HEADER, FakeImsApp
from imsd.fakeims.state import FakeImsState
from imsd.httpserver import HttpServer, StreamWrapper, bound_port, tcp_listener

__all__ = ["FakeIms", "run_fake_ims"]

_DRIP: Final = re.compile(rb"\r\n" + DRIP_HEADER.encode() + rb": *([0-9.]+)\r", re.IGNORECASE)

DEMO_SCOPES: Final = (
    "openid",
    "AdobeID",
    "read_organizations",
    "additional_info.projectedProductContext",
    "session",
)


class _DripStream(StreamWrapper):
    """A connection that sends an answer marked with :data:`DRIP_HEADER` head first, then
    its body one byte per that many seconds: every read gets a byte in time, so only an
    overall deadline ends the exchange. Anything else passes through unchanged."""

    async def send(self, item: bytes) -> None:
        head, sep, body = item.partition(b"\r\n\r\n")
        mark = _DRIP.search(head) if sep else None
        if mark is None:
            await self._inner.send(item)
            return
        await self._inner.send(head + sep)
        for i in range(len(body)):
            await anyio.sleep(float(mark.group(1)))
            await self._inner.send(body[i : i + 1])


class _DripListener(anyio.abc.Listener[anyio.abc.ByteStream]):
    def __init__(self, inner: Any) -> None:
        self._inner = inner  # one socket listener (HttpServer calls its accept())

    async def accept(self) -> anyio.abc.ByteStream:
        return _DripStream(await self._inner.accept())

    async def serve(
        self,
        handler: Callable[[anyio.abc.ByteStream], Any],
        task_group: anyio.abc.TaskGroup | None = None,
    ) -> None:
        raise NotImplementedError("HttpServer accepts itself")

    async def aclose(self) -> None:
        await self._inner.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return cast("Mapping[Any, Callable[[], Any]]", self._inner.extra_attributes)


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
            sockets = getattr(listener, "listeners", [listener])  # IPv4 and IPv6
            async with anyio.create_task_group() as tg:
                await tg.start(server.serve, [_DripListener(inner) for inner in sockets])
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
