"""A real ``redis-server`` on a Unix socket for the fleet-mode tests (``test_fleet``,
``test_fleet_processes``): started and stopped by the test (a restart loses its data:
``--save ""``), always killed at teardown."""

from __future__ import annotations

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
        self.socket = tmp / "redis.sock"
        self.url = f"unix://{self.socket}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.socket.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [self.binary, "--port", "0", "--unixsocket", str(self.socket), "--save", ""],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)

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
