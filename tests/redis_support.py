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
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import coredis

from tests.requirements import need_tool

__all__ = ["HostileRedis", "RedisServer", "hostile_redis", "redis_client", "redis_server"]


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


class HostileRedis:
    """A server on the coordination address that speaks RESP3 well enough for a client to
    connect and subscribe (HELLO, PING, SUBSCRIBE), and answers every other command (GET,
    EVAL…) with *reply*, raw RESP bytes: a wrong shape, a bomb, garbage. One thread per
    connection; closed at teardown."""

    HELLO = (
        b"%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$5\r\n7.0.0\r\n"
        b"$5\r\nproto\r\n:3\r\n$2\r\nid\r\n:1\r\n$4\r\nmode\r\n$10\r\nstandalone\r\n"
        b"$4\r\nrole\r\n$6\r\nmaster\r\n$7\r\nmodules\r\n*0\r\n"
    )

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.commands: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            t = threading.Thread(target=self._talk, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _talk(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        with conn, reader:
            while True:
                try:
                    args = self._command(reader)
                except (OSError, ValueError):
                    return
                if args is None:
                    return
                name = args[0].upper()
                self.commands.append(name)
                if name == b"HELLO":
                    out = self.HELLO
                elif name == b"PING":
                    out = b"+PONG\r\n"
                elif name in (b"SUBSCRIBE", b"UNSUBSCRIBE"):
                    kind = name.lower()
                    out = b"".join(
                        b">3\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n:1\r\n" % (len(kind), kind, len(c), c)
                        for c in args[1:]
                    )
                else:
                    out = self.reply
                try:
                    conn.sendall(out)
                except OSError:
                    return

    @staticmethod
    def _command(reader: Any) -> list[bytes] | None:
        head = reader.readline()
        if not head:
            return None
        if not head.startswith(b"*"):
            raise ValueError("inline commands are not spoken here")
        args = []
        for _ in range(int(head[1:])):
            size = int(reader.readline()[1:])
            args.append(reader.read(size + 2)[:-2])
        return args

    def close(self) -> None:
        self.sock.close()


@contextmanager
def hostile_redis(reply: bytes) -> Iterator[HostileRedis]:
    server = HostileRedis(reply)
    try:
        yield server
    finally:
        server.close()
