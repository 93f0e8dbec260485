from __future__ import annotations

import contextlib
import gzip
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import httpx
import pytest
from imsd.catalog import Added
from imsd.cli import main
from imsd.credentials import builtin_auth_methods
from imsd.daemon import Daemon
from imsd.exchange import ImsClient, check_url
from imsd.fakeims.app import gzip_bomb
from imsd.fakeims.server import FakeIms
from imsd.flows import Flow, flow_for, parse_token_response
from imsd.model import Credential, Grant, HttpRequest, ImsError, ImsErrorKind, Secret
from imsd.registry import load_registry
from imsd.supervisor import Supervisor
from structlog.testing import capture_logs

from tests.support import ORG, live, uds, wait_for, write_cred

pytestmark = pytest.mark.anyio
GZIP = {"content-encoding": "gzip"}

#: A canned answer: the raw bytes an HTTP server writes, chunk by chunk.
Answer = Callable[[str, Mapping[str, str]], AsyncIterator[bytes]]


def head(status: int, **fields: str) -> bytes:
    lines = [f"HTTP/1.1 {status} X"] + [f"{k.replace('_', '-')}: {v}" for k, v in fields.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def whole(status: int, body: bytes, **fields: str) -> AsyncIterator[bytes]:
    yield head(status, content_length=str(len(body)), **fields) + body


@asynccontextmanager
async def canned(answer: Answer) -> AsyncIterator[str]:
    """A raw HTTP/1.1 server on loopback: each request's head is read, then *answer*
    (given the path and lower-cased headers) writes the response bytes, then it closes."""

    async def serve(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive()
            first, *lines = data.split(b"\r\n\r\n")[0].decode().split("\r\n")
            fields = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines)}
            with contextlib.suppress(anyio.BrokenResourceError, OSError):
                async for chunk in answer(first.split()[1], fields):
                    await stream.send(chunk)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        yield f"http://127.0.0.1:{port}"
        tg.cancel_scope.cancel()


def client_credentials_flow(cred: Credential, now: float) -> Flow:
    """The built-in S2S method's flow, reached the way the daemon reaches it."""
    return flow_for(cred, builtin_auth_methods(), now=now)


@pytest.fixture
def fake() -> Iterator[FakeIms]:
    # Not conftest's: one minimal client (``cid``), the one ``cred()`` below describes.
    with FakeIms.in_thread() as f:
        f.state.add_client("cid", secrets=["s3cret"], scopes=["openid"], org_id=ORG)
        yield f


def cred(url: str, secret: str = "s3cret") -> Credential:
    return Credential(
        name="c",
        path=Path("/c.toml"),
        auth="oauth_server_to_server",
        client_id="cid",
        client_secret=Secret(secret),
        org_id=ORG,
        scopes=("openid",),
        ims_url=url,
    )


async def test_success_and_error_kinds(fake: FakeIms) -> None:
    codes: list[int | str] = []
    async with ImsClient(on_response=codes.append) as client:
        grant = await client.run(client_credentials_flow(cred(fake.url), 0.0))
        assert fake.state.validate_token(grant.access_token.reveal()) is not None
        with pytest.raises(ImsError) as err:
            await client.run(client_credentials_flow(cred(fake.url, "wrong"), 0.0))
        assert (err.value.kind, err.value.code) == (ImsErrorKind.PERMANENT, "invalid_client")
        fake.state.throttle_next(1, retry_after=3)
        with pytest.raises(ImsError) as err:
            await client.run(client_credentials_flow(cred(fake.url), 0.0))
        assert (err.value.kind, err.value.retry_after) == (ImsErrorKind.THROTTLED, 3)
        fake.state.fail_next(1, status=502)
        with pytest.raises(ImsError) as err:
            await client.run(client_credentials_flow(cred(fake.url), 0.0))
        assert err.value.kind is ImsErrorKind.TRANSIENT
    assert codes == [200, 401, 429, 502]


async def test_connection_refused_and_reset_are_transient(fake: FakeIms) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    codes: list[int | str] = []
    async with ImsClient(on_response=codes.append) as client:
        with pytest.raises(ImsError) as err:
            await client.run(client_credentials_flow(cred(f"http://127.0.0.1:{port}"), 0.0))
        assert (err.value.kind, err.value.code) == (ImsErrorKind.TRANSIENT, "network_error")
        fake.state.reset_next(1)
        with pytest.raises(ImsError) as err:
            await client.run(client_credentials_flow(cred(fake.url), 0.0))
        assert err.value.kind is ImsErrorKind.TRANSIENT
        assert "s3cret" not in str(err.value)
    assert codes == ["network_error", "network_error"]


@pytest.mark.parametrize(
    "times", [(float("nan"), 2e9), (1.8e9, float("inf")), (1.8e9, 1e300), (1.8e9, 1.7e9)]
)
async def test_a_grant_with_unusable_times_is_a_failed_attempt(
    fake: FakeIms, times: tuple[float, float]
) -> None:
    """A third-party flow may build its Grant itself: its times are checked at the driver,
    so a NaN fails the attempt (the last good token stays) instead of crashing later."""

    def flow() -> Flow:
        yield from ()
        return Grant(Secret("t"), "bearer", *times)

    async with ImsClient() as client:
        with pytest.raises(ImsError) as err:
            await client.run(flow())
    assert (err.value.kind, err.value.code) == (ImsErrorKind.TRANSIENT, "invalid_response")


async def test_timeout(fake: FakeIms) -> None:
    fake.state.hang(2)
    async with ImsClient(timeout=0.2) as client:
        with pytest.raises(ImsError) as err:
            await client.run(client_credentials_flow(cred(fake.url), 0.0))
    fake.state.hang(0)
    assert err.value.code == "timeout"


async def test_a_dripping_ims_is_cut_at_the_overall_deadline(fake: FakeIms) -> None:
    """One byte every 50 ms never trips a per-read timeout of 0.5 s; the whole exchange has
    that deadline. (The outer fail_after only turns a hang into a failure.)"""
    fake.state.drip(0.05)  # a token answer of ~800 bytes would take 40 s
    codes: list[int | str] = []
    try:
        with anyio.fail_after(20):
            async with ImsClient(timeout=0.5, on_response=codes.append) as client:
                with pytest.raises(ImsError) as err:
                    await client.run(client_credentials_flow(cred(fake.url), 0.0))
    finally:
        fake.state.drip(0)
    assert (err.value.kind, err.value.code) == (ImsErrorKind.TRANSIENT, "timeout")
    assert codes == ["network_error"]


class NullSink:
    def write(self, name: str, files: Mapping[str, bytes]) -> None:
        pass

    def remove(self, name: str) -> None:
        pass

    def in_memory(self) -> bool:
        return True


async def test_watchdog_sees_an_exchange_past_its_deadline(fake: FakeIms) -> None:
    """A fetch in flight used to be never "stuck". If the deadline ever fails to end an
    exchange (a blocked loop, a bug), the watchdog must see it: the client's monotonic clock
    is stepped past deadline + grace while the fake IMS holds the answer."""
    mono = [0.0]
    fake.state.hang(30)
    try:
        async with (
            ImsClient(timeout=30, monotonic=lambda: mono[0]) as client,
            anyio.create_task_group() as tg,
        ):
            sup = Supervisor(client=client, sink=NullSink(), products=load_registry().products)
            await tg.start(sup.run)
            await sup.apply([Added(cred(fake.url))])
            with anyio.fail_after(10):
                while fake.state.in_flight == 0:
                    await anyio.sleep(0.01)
            now = time.time()
            assert sup.stuck(now, grace=60) == []  # in flight, within its deadline
            mono[0] += 30 + 60 + 1
            assert sup.stuck(now, grace=60) == ["c"]
            tg.cancel_scope.cancel()
    finally:
        fake.state.hang(0)


async def test_concurrency_cap(fake: FakeIms) -> None:
    fake.state.hang(0.2)  # every answer takes a while, so requests overlap at the fake
    async with ImsClient(max_concurrent=3, rate=None) as client, anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(client.run, client_credentials_flow(cred(fake.url), 0.0))
    fake.state.hang(0)
    assert fake.state.request_count("cid") == 10
    assert fake.state.peak_in_flight == 3


async def test_body_cap_and_insecure_urls() -> None:
    big = canned(lambda path, fields: whole(200, b"x" * 5000))
    async with big as url, ImsClient(max_body=1000) as client:
        with pytest.raises(ImsError) as err:
            await client.run(client_credentials_flow(cred(url), 0.0))
    assert err.value.code == "response_too_large"
    for url in ("http://ims.example.com", "ftp://127.0.0.1", "http://10.0.0.1:80"):
        with pytest.raises(ImsError, match="insecure_url"):
            check_url(url + "/ims/token/v3")
    check_url("http://127.0.0.1:8080/ims/token/v3")
    check_url("http://[::1]:8080/x")
    check_url("https://ims-na1.adobelogin.com/ims/token/v3")


async def test_gzip_bomb_is_refused_without_decoding(fake: FakeIms) -> None:
    """A hostile IMS answers 100 MiB of zeros gzipped into 100 KiB, whatever was asked. The
    answer is refused from its headers: memory stays far below even one decoded chunk."""
    gzip_bomb()  # the fake's copy, built before measuring
    fake.state.bomb_next(1)
    tracemalloc.start()
    try:
        async with ImsClient() as client:
            with pytest.raises(ImsError) as err:
                await client.run(client_credentials_flow(cred(fake.url), 0.0))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (err.value.kind, err.value.code) == (ImsErrorKind.TRANSIENT, "response_compressed")
    assert peak < 8 << 20, f"peak {peak >> 20} MiB"
    async with ImsClient() as client:  # the next answer is a plain one again
        await client.run(client_credentials_flow(cred(fake.url), 0.0))


async def test_identity_asked_and_raw_bytes_capped() -> None:
    """Accept-Encoding is identity even when a flow asks otherwise; an endless body without
    Content-Length is read no further than the cap; a compressed one is not read at all."""
    seen: list[str] = []

    async def answer(path: str, fields: Mapping[str, str]) -> AsyncIterator[bytes]:
        seen.append(fields["accept-encoding"])
        if path == "/gzip":
            async for chunk in whole(200, gzip.compress(b"{}"), **GZIP):
                yield chunk
            return
        yield head(200, transfer_encoding="chunked")
        while True:  # until the client hangs up
            yield b"3e8\r\n" + b"x" * 1000 + b"\r\n"

    def flow(url: str) -> Flow:
        headers = {"accept-encoding": "gzip, br"}
        yield HttpRequest("POST", url, headers=headers)
        raise AssertionError("unreachable")

    tracemalloc.start()
    try:
        async with canned(answer) as url, ImsClient(max_body=10_000) as client:
            with pytest.raises(ImsError) as err:
                await client.run(flow(f"{url}/endless"))
            assert err.value.code == "response_too_large"
            with pytest.raises(ImsError) as err:
                await client.run(flow(f"{url}/gzip"))
            assert err.value.code == "response_compressed"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == ["identity", "identity"]
    assert peak < 1 << 20, f"peak {peak >> 10} KiB"  # the endless body was not kept


async def test_a_failure_carries_the_answers_x_debug_id(fake: FakeIms) -> None:
    """IMS's x-debug-id (the fake sends one with every answer) rides on the error: on a
    refusal, on a 2xx without a usable token (the flow's error, filled in by the driver) and
    on an answer refused unread; a network error has none."""
    async with ImsClient() as client:
        with pytest.raises(ImsError) as err:
            await client.run(client_credentials_flow(cred(fake.url, "wrong"), 0.0))
    assert err.value.code == "invalid_client"
    assert len(err.value.debug_id or "") == 16

    async def answer(path: str, fields: Mapping[str, str]) -> AsyncIterator[bytes]:
        if path == "/big":
            async for chunk in whole(200, b"x" * 5000, x_debug_id="dbg-big"):
                yield chunk
            return
        yield head(200, transfer_encoding="chunked", X_Debug_Id="dbg-1")  # streamed
        body = b'{"token_type": "bearer"}'
        yield b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)

    def flow(url: str) -> Flow:
        response = yield HttpRequest("POST", url)
        return parse_token_response(response, now=0.0)

    async with canned(answer) as url, ImsClient(max_body=1000) as client:
        with pytest.raises(ImsError) as err:
            await client.run(flow(f"{url}/ims/token/v3"))
        assert (err.value.code, err.value.debug_id) == ("invalid_response", "dbg-1")
        with pytest.raises(ImsError) as err:
            await client.run(flow(f"{url}/big"))
        assert (err.value.code, err.value.debug_id) == ("response_too_large", "dbg-big")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with ImsClient() as client:
        with pytest.raises(ImsError) as err:
            await client.run(client_credentials_flow(cred(f"http://127.0.0.1:{port}"), 0.0))
    assert (err.value.code, err.value.debug_id) == ("network_error", None)


async def test_the_debug_id_of_a_failed_refresh_reaches_status_the_socket_and_the_logs(
    fake: FakeIms,
    tmp_path: Path,
    running: Callable[..., Awaitable[Daemon]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """End to end: a daemon whose secret IMS refuses records the answer's x-debug-id; the
    log line, ``GET /v1/credentials``, the socket's error bodies and ``imsd status`` show it."""
    write_cred(tmp_path / "creds", "bad", fake, client_id="cid", secret="wrong")
    with capture_logs() as logs:
        d = await running()
        bad = live(d, "bad")
        await wait_for(lambda: bad.debug_id is not None)
    debug_id = bad.debug_id
    assert bad.fetch_error.startswith("HTTP 401 invalid_client")
    assert debug_id not in bad.fetch_error
    [line, *_] = [e for e in logs if e["event"] == "token.refresh_failed"]
    assert (line["error"], line["debug_id"]) == (bad.fetch_error, debug_id)
    async with uds(d) as c:
        [row] = (await c.get("/v1/credentials")).json()["credentials"]
        token = (await c.get("/v1/credentials/bad/token")).json()
        refresh = (await c.post("/v1/credentials/bad/refresh")).json()
    assert (row["last_error"], row["debug_id"]) == (bad.fetch_error, debug_id)
    assert (token["error"], token["debug_id"]) == ("expired", debug_id)
    assert (refresh["error"], refresh["debug_id"]) == ("too_many_requests", debug_id)
    code = await anyio.to_thread.run_sync(main, ["status", "--socket", str(d.settings.socket)])
    out = capsys.readouterr().out
    assert code == 0
    assert f"{bad.fetch_error} (x-debug-id {debug_id})" in out


def test_the_fake_sends_an_x_debug_id_with_every_ims_answer(fake: FakeIms) -> None:
    """As IMS does: refusals and the other IMS endpoints too, so the daemon's paths that
    record it are exercised whatever the answer."""
    with httpx.Client(base_url=fake.url) as c:
        answers = [
            c.get("/ims/token/v3"),  # 405
            c.post("/ims/token/v3", data={"grant_type": "client_credentials"}),  # 400
            c.post("/ims/validate_token/v1", data={"token": "x"}),
        ]
    for r in answers:
        assert len(r.headers["x-debug-id"]) == 16, r.status_code
    assert len({r.headers["x-debug-id"] for r in answers}) == len(answers)


async def test_a_token_request_is_sent_again_when_its_pooled_connection_was_dropped() -> None:
    """An IMS that drops a kept-alive connection as the next request arrives (its idle
    timeout raced our reuse) costs no refresh: a token request may be sent twice, so it
    goes again on a new connection. The first connection had answered one request."""
    body = b'{"access_token": "at", "token_type": "bearer", "expires_in": 86400}'
    connections: list[int] = []

    async def serve(stream: anyio.abc.SocketStream) -> None:
        connections.append(0)
        async with stream:
            data = b""
            while True:
                while b"\r\n\r\n" not in data:
                    data += await stream.receive()
                data = b""  # the small form came with its head (one write)
                if len(connections) == 1 and connections[0] == 1:
                    return  # the second request on the first connection: dropped unanswered
                connections[-1] += 1
                await stream.send(head(200, content_length=str(len(body))) + body)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    url = f"http://127.0.0.1:{listener.extra(anyio.abc.SocketAttribute.local_port)}"

    def flow() -> Flow:
        response = yield HttpRequest("POST", f"{url}/ims/token/v3", form={"a": "b"})
        return parse_token_response(response, now=0.0)

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        async with ImsClient(rate=None) as client:
            assert (await client.run(flow())).access_token.reveal() == "at"
            assert (await client.run(flow())).access_token.reveal() == "at"
        tg.cancel_scope.cancel()
    assert connections == [1, 1]


async def test_a_network_error_names_the_host_and_never_a_userinfo_part() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once bound: nothing listens there
    url = f"http://user:UserinfoSecret42@127.0.0.1:{port}"
    async with ImsClient() as client:
        with pytest.raises(ImsError) as err:
            await client.run(client_credentials_flow(cred(url), 0.0))
    assert err.value.code == "network_error"
    assert f"IMS did not connect (127.0.0.1:{port})" in str(err.value)
    assert "UserinfoSecret42" not in str(err.value)
    assert "user" not in str(err.value).split("(")[-1]
