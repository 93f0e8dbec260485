"""The socket load generator: ``python -m bench.loadgen SOCKET PATH CLIENTS SECONDS``.

CLIENTS keep-alive HTTP/1.1 connections on one anyio loop (its own process, so it does not
share a GIL with what it measures) send ``GET PATH`` back to back for SECONDS and report every
request's latency as JSON on stdout."""

from __future__ import annotations

import json
import sys
import time

import anyio


async def main(path: str, target: str, clients: int, seconds: float) -> None:
    request = f"GET {target} HTTP/1.1\r\nHost: imsd\r\n\r\n".encode()
    latencies: list[float] = []
    errors: list[str] = []
    end = time.perf_counter() + seconds

    async def client() -> None:
        try:
            while time.perf_counter() < end:
                await connection()
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")

    async def connection() -> None:
        """One keep-alive connection, until the server says ``Connection: close``."""
        async with await anyio.connect_unix(path) as s:
            buf = b""
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                await s.send(request)
                while b"\r\n\r\n" not in buf:
                    buf += await s.receive()
                head, _, buf = buf.partition(b"\r\n\r\n")
                lower = head.lower()
                length = int(lower.split(b"content-length: ")[1].split(b"\r\n")[0])
                while len(buf) < length:
                    buf += await s.receive()
                buf = buf[length:]
                latencies.append(time.perf_counter() - t0)
                if not head.startswith(b"HTTP/1.1 200"):
                    errors.append(head.split(b"\r\n")[0].decode())
                if b"connection: close" in lower:
                    return

    async with anyio.create_task_group() as tg:
        for _ in range(clients):
            tg.start_soon(client)
    print(json.dumps({"latencies": latencies, "errors": errors[:20], "seconds": seconds}))


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
