"""A streaming stand-in for an Adobe API behind the fake gateway, for the proxy's tests.

:class:`~imsd.httpserver.HttpServer` (the fake IMS's server) reads whole bodies under a cap;
an API that takes and gives 100 MB must not. This server reads each request's head with h11,
applies the fake gateway's checks to it (:func:`imsd.fakeims.gateway.handle`: the headers
Adobe checks, per product), then, under ``/gateway/PRODUCT/_fake/``:

- ``upload``: reads the body as it comes; answers its size and SHA-256
- ``download?size=N``: sends N bytes (a repeating pattern) with a Content-Length
- ``headers``: answers the request's headers (what the proxy forwarded)
- ``hang``: never answers

Any other path is the gateway's own answer. Every request is logged in :attr:`requests`
(method, path, status; an upload also logs ``started``, and ``aborted`` if it stops
short); :attr:`connections` counts the connections open now.
"""

from __future__ import annotations

import hashlib
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import anyio
import anyio.abc
import h11

from imsd.fakeims import gateway
from imsd.fakeims.state import FakeImsState
from imsd.httpserver import Request, Response, bound_port, tcp_listener

__all__ = ["BulkApi", "pattern"]

_CHUNK: Final = 65536
_PATTERN: Final = bytes(range(256)) * (_CHUNK // 256)


def pattern(size: int) -> bytes:
    """The first *size* bytes ``download`` sends (for small checks)."""
    return (_PATTERN * (size // len(_PATTERN) + 1))[:size]


class BulkApi:
    def __init__(self, state: FakeImsState) -> None:
        self.state = state
        self.url = ""
        self.requests: list[tuple[str, str, str]] = []
        self.connections = 0

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        listener = await tcp_listener("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{bound_port(listener)}"
        async with listener, anyio.create_task_group() as tg:
            task_status.started(self.url)
            await listener.serve(self._connection, tg)

    async def _connection(self, stream: anyio.abc.ByteStream) -> None:
        conn = h11.Connection(h11.SERVER)
        self.connections += 1
        async with stream:
            try:
                while await self._one(conn, stream):
                    conn.start_next_cycle()
            except (anyio.BrokenResourceError, anyio.EndOfStream, h11.ProtocolError, OSError):
                return
            finally:
                self.connections -= 1

    async def _event(self, conn: h11.Connection, stream: anyio.abc.ByteStream) -> Any:
        while (event := conn.next_event()) is h11.NEED_DATA:
            try:
                conn.receive_data(await stream.receive(_CHUNK))
            except anyio.EndOfStream:
                conn.receive_data(b"")
        return event

    async def _one(self, conn: h11.Connection, stream: anyio.abc.ByteStream) -> bool:
        event = await self._event(conn, stream)
        if not isinstance(event, h11.Request):
            return False
        target = event.target.decode("latin-1")
        parts = urlsplit(target)
        req = Request(
            method=event.method.decode("ascii"),
            target=target,
            path=parts.path,
            query=parse_qs(parts.query),
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers],
            body=b"",
            peer=None,
        )
        checked = gateway.handle(self.state, req, parts.path)
        action = parts.path.rsplit("/_fake/", 1)[1] if "/_fake/" in parts.path else ""
        if checked.status != 200 or not action:
            await self._drain(conn, stream)
            return await self._answer(conn, stream, req, checked)
        if action == "hang":
            self.requests.append((req.method, req.path, "hang"))
            await anyio.sleep_forever()
        if action == "upload":
            digest, size = hashlib.sha256(), 0
            self.requests.append((req.method, req.path, "started"))
            try:
                while isinstance(ev := await self._event(conn, stream), h11.Data):
                    digest.update(ev.data)
                    size += len(ev.data)
            except (h11.RemoteProtocolError, anyio.BrokenResourceError, OSError):
                ev = None
            if not isinstance(ev, h11.EndOfMessage):
                self.requests.append((req.method, req.path, "aborted"))
                return False
            body = {"bytes": size, "sha256": digest.hexdigest()}
            return await self._answer(conn, stream, req, Response.json(body))
        await self._drain(conn, stream)
        if action == "headers":
            return await self._answer(conn, stream, req, Response.json(req.headers))
        if action == "download":
            size = int(req.query.get("size", ["0"])[0])
            self.requests.append((req.method, req.path, "200"))
            head = [("Content-Type", "application/octet-stream"), ("Content-Length", str(size))]
            await stream.send(conn.send(h11.Response(status_code=200, headers=head)) or b"")
            while size > 0:
                chunk = _PATTERN[: min(size, len(_PATTERN))]
                await stream.send(conn.send(h11.Data(data=chunk)) or b"")
                size -= len(chunk)
            await stream.send(conn.send(h11.EndOfMessage()) or b"")
            return True
        return await self._answer(conn, stream, req, Response.json({"error": "no such"}, 404))

    async def _drain(self, conn: h11.Connection, stream: anyio.abc.ByteStream) -> None:
        while not isinstance(
            await self._event(conn, stream), h11.EndOfMessage | h11.ConnectionClosed
        ):
            pass

    async def _answer(
        self, conn: h11.Connection, stream: anyio.abc.ByteStream, req: Request, resp: Response
    ) -> bool:
        self.requests.append((req.method, req.path, str(resp.status)))
        headers = [*resp.headers, ("Content-Length", str(len(resp.body)))]
        data = conn.send(h11.Response(status_code=resp.status, headers=headers)) or b""
        if req.method != "HEAD":
            data += conn.send(h11.Data(data=resp.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.send(data)
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE
