"""The h11 server over real TCP and Unix sockets."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import httpx
import pytest
from imsd.httpserver import (
    SEND_SLICE,
    HttpServer,
    Request,
    Response,
    bound_port,
    tcp_listener,
    unix_listener,
)

pytestmark = pytest.mark.anyio


async def echo(req: Request) -> Response:
    if req.path == "/boom":
        raise RuntimeError("handler bug")
    peer = None if req.peer is None else [req.peer.pid, req.peer.uid, req.peer.gid]
    return Response.json(
        {
            "method": req.method,
            "path": req.path,
            "query": req.query,
            "body": req.body.decode(),
            "peer": peer,
            "agent": req.header("User-Agent"),
        }
    )


@pytest.fixture
async def tcp() -> AsyncIterator[int]:
    listener = await tcp_listener("127.0.0.1", 0)
    port = bound_port(listener)
    async with anyio.create_task_group() as tg:
        await tg.start(
            HttpServer(echo, idle_timeout=1.0, max_body=1024, max_header_bytes=2048).serve,
            [listener],
        )
        yield port
        tg.cancel_scope.cancel()


async def raw(port: int, data: bytes) -> bytes:
    async with await anyio.connect_tcp("127.0.0.1", port) as s:
        await s.send(data)
        chunks = b""
        with anyio.move_on_after(5):
            try:
                while True:
                    chunks += await s.receive()
            except anyio.EndOfStream:
                pass
        return chunks


async def test_round_trip_and_keep_alive(tcp: int) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{tcp}") as c:
        r1 = await c.get("/a?x=1&x=2", headers={"User-Agent": "t"})
        r2 = await c.post("/b", content=b"hello")
    assert r1.json() == {
        "method": "GET",
        "path": "/a",
        "query": {"x": ["1", "2"]},
        "body": "",
        "peer": None,
        "agent": "t",
    }
    assert r2.json()["body"] == "hello"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"NOT HTTP\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n", 413),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n", 431),
        (b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", 200),  # a path, not a file
    ],
)
async def test_protocol_errors(tcp: int, request_bytes: bytes, status: int) -> None:
    answer = await raw(tcp, request_bytes)
    assert answer.startswith(f"HTTP/1.1 {status}".encode()), answer[:80]


async def test_handler_exception_is_500_and_server_survives(tcp: int) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{tcp}") as c:
        r = await c.get("/boom")
        assert (r.status_code, r.json()["error"]) == (500, "internal_error")
        assert (await c.get("/ok")).status_code == 200


async def closed_by_peer(stream: anyio.abc.ByteStream) -> bool:
    try:
        while True:
            await stream.receive()
    except (anyio.EndOfStream, anyio.BrokenResourceError):
        return True


async def test_idle_client_does_not_block_others(tcp: int) -> None:
    async with await anyio.connect_tcp("127.0.0.1", tcp) as idle:
        await idle.send(b"GET / HTTP/1.1\r\n")  # never finishes its request
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{tcp}") as c:
            assert (await c.get("/other")).status_code == 200
        with anyio.fail_after(5):  # the idle one is dropped after idle_timeout
            assert await closed_by_peer(idle)


async def test_unix_socket_peer_credentials_and_stale_file(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on: a crashed run
    listener = await unix_listener(path, mode=0o660)
    assert os.stat(path).st_mode & 0o777 == 0o660
    async with anyio.create_task_group() as tg:
        await tg.start(HttpServer(echo).serve, [listener])
        transport = httpx.AsyncHTTPTransport(uds=str(path))
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as c:
            peer = (await c.get("/")).json()["peer"]
        assert peer == [os.getpid(), os.getuid(), os.getgid()]
        with pytest.raises(OSError, match="another process is listening"):
            await unix_listener(path)
        tg.cancel_scope.cancel()


async def test_non_socket_file_is_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    path.write_text("important")
    with pytest.raises(OSError, match="not a socket"):
        await unix_listener(path)
    assert path.read_text() == "important"


async def test_shutdown_drains_in_flight() -> None:
    """Newcomers are refused and idle keep-alive connections closed at once; a request
    already begun finishes and is answered with Connection: close."""
    started, release = anyio.Event(), anyio.Event()

    async def handler(req: Request) -> Response:
        if req.path == "/slow":
            started.set()
            await release.wait()
        return Response.text("done")

    listener = await tcp_listener("127.0.0.1", 0)
    port = bound_port(listener)
    server = HttpServer(handler, idle_timeout=60)
    result: list[Any] = []
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, [listener])
        idle = await anyio.connect_tcp("127.0.0.1", port)
        await idle.send(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"done" in await idle.receive()  # now waiting for its next request

        async def call() -> None:
            async with httpx.AsyncClient() as c:
                r = await c.get(f"http://127.0.0.1:{port}/slow")
                result.append((r.status_code, r.text, r.headers.get("connection")))

        tg.start_soon(call)
        await started.wait()
        stopped = anyio.Event()

        async def stop() -> None:
            await server.shutdown(grace=60)
            stopped.set()

        tg.start_soon(stop)
        with pytest.raises(anyio.EndOfStream):
            await idle.receive()
        await idle.aclose()
        with pytest.raises(OSError, match="connection attempts failed"):
            await anyio.connect_tcp("127.0.0.1", port)  # refused, not left in the backlog
        assert not result
        assert not stopped.is_set()
        release.set()
        await stopped.wait()
    assert result == [(200, "done", "close")]


async def test_shutdown_cancels_what_outlives_the_grace() -> None:
    started = anyio.Event()

    async def stuck(req: Request) -> Response:
        started.set()
        await anyio.sleep_forever()
        raise AssertionError

    listener = await tcp_listener("127.0.0.1", 0)
    port = bound_port(listener)
    server = HttpServer(stuck)
    failed: list[BaseException] = []
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, [listener])

        async def call() -> None:
            async with httpx.AsyncClient() as c:
                try:
                    await c.get(f"http://127.0.0.1:{port}/")
                except httpx.TransportError as e:
                    failed.append(e)

        tg.start_soon(call)
        await started.wait()
        await server.shutdown(grace=0.05)
    assert len(failed) == 1  # dropped without an answer once the grace ran out


class _Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def connection_event(self, listener: str, event: str) -> None:
        self.seen.append((listener, event))


async def test_connection_cap_sheds_the_oldest_idle_first() -> None:
    listener = await tcp_listener("127.0.0.1", 0)
    port = bound_port(listener)
    events = _Events()
    server = HttpServer(echo, idle_timeout=30.0, max_connections=3, observer=events, name="t")
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, [listener])
        idle = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(3)]
        for s in idle:  # in order, so the first is the oldest idle
            await s.send(b"GET / HTTP/1.1\r\n")
            await anyio.sleep(0.05)
        await wait_connections(server, 3)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            assert (await c.get("/newcomer")).status_code == 200
        with anyio.fail_after(5):
            assert await closed_by_peer(idle[0])
        assert ("t", "shed") in events.seen
        for s in idle[1:]:  # the younger ones were left alone
            with anyio.move_on_after(0.2):
                await s.receive()
                pytest.fail("a younger idle connection was closed")
        for s in idle:
            await s.aclose()
        assert server.connections <= 3
        tg.cancel_scope.cancel()


async def wait_connections(server: HttpServer, n: int) -> None:
    with anyio.fail_after(5):
        while server.connections != n:
            await anyio.sleep(0.01)


class _FlakyListener:
    """A listener whose accept() fails like a process out of descriptors, then recovers."""

    def __init__(self, inner: Any, failures: int) -> None:
        self.inner = inner
        self.failures = failures

    async def accept(self) -> Any:
        if self.failures:
            self.failures -= 1
            await anyio.lowlevel.checkpoint()
            raise OSError(24, "Too many open files")
        return await self.inner.accept()


async def test_accept_errors_never_end_the_server() -> None:
    listener = await tcp_listener("127.0.0.1", 0)
    port = bound_port(listener)
    events = _Events()
    flaky = _FlakyListener(listener.listeners[0], failures=5)  # type: ignore[attr-defined]
    async with anyio.create_task_group() as tg:
        await tg.start(HttpServer(echo, observer=events, name="t").serve, [flaky])
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            assert (await c.get("/after")).status_code == 200
        assert events.seen.count(("t", "accept_error")) == 5
        tg.cancel_scope.cancel()
    await listener.aclose()


async def test_a_client_that_never_reads_its_answers_is_dropped() -> None:
    big = Response(200, b"x" * (1 << 20))

    async def handler(req: Request) -> Response:
        return big

    listener = await tcp_listener("127.0.0.1", 0)
    port = bound_port(listener)
    server = HttpServer(handler, idle_timeout=1.0)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, [listener])
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 20)  # pipelined, never read
            await wait_connections(server, 1)
            await wait_connections(server, 0)  # the write deadline dropped it
        finally:
            sock.close()
        tg.cancel_scope.cancel()


async def test_a_large_answer_goes_out_in_paced_slices() -> None:
    """Issue 23 item 11: a 2.5 MB /metrics answer was written in one send (the loop held for
    the whole copy). Now each slice of at most SEND_SLICE is one send, after its ``pace``."""
    paced: list[int] = []

    async def pace(size: int) -> None:
        paced.append(size)

    body = bytes(range(256)) * 4096 + b"tail"  # 1 MiB and a bit: not a multiple of a slice
    small = Response(200, b"small", pace=pace)

    async def handler(req: Request) -> Response:
        return small if req.path == "/small" else Response(200, body, pace=pace)

    listener = await tcp_listener("127.0.0.1", 0)
    port = bound_port(listener)
    async with anyio.create_task_group() as tg:
        await tg.start(HttpServer(handler).serve, [listener])
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            r = await c.get("/big")
            assert r.content == body
            assert len(paced) == -(-len(body) // SEND_SLICE)
            assert max(paced) == SEND_SLICE
            assert sum(paced) == len(body)
            paced.clear()
            assert (await c.get("/small")).content == b"small"  # one send, paced too
            assert paced == [5]
            assert (await c.head("/big")).content == b""  # no body, nothing to pace
            assert paced == [5]
        tg.cancel_scope.cancel()
