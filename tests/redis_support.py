"""A real ``redis-server`` on a loopback port for the fleet-mode tests (``test_fleet``,
``test_fleet_processes``): started and stopped by the test (a restart loses its data:
``--save ""``, and keeps its port), always killed at teardown.

Not a Unix socket: anyio's ``connect_unix`` (4.x, asyncio backend) can leave a writer
callback that sets a cancelled future's result when a pending connect is cancelled, which
the test runner reports as an ``InvalidStateError`` (a daemon cancelled while its Redis
client reconnects). TCP connects go through asyncio's own ``sock_connect``."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import coredis

from tests.requirements import need_tool

__all__ = ["RedisServer", "redis_client", "redis_server"]


class RedisServer:
    def __init__(self, tmp: Path) -> None:
        self.binary = need_tool("redis-server", "apt-get install redis-server")
        with socket.socket() as probe:  # a free port, kept across restarts
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", ""],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:  # polling a child process's port: no event to wait on
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert self.proc.poll() is None, "redis-server exited"
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)  # its port is polled, under the deadline above

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@contextmanager
def redis_server(tmp: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def redis_client(url: str) -> coredis.Redis[bytes]:
    return coredis.Redis.from_url(url, verify_version=False)
