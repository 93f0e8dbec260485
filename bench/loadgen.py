"""The load generator: ``python -m bench.loadgen SOCKET PATH CLIENTS SECONDS [HEADERS]``.

CLIENTS keep-alive HTTP/1.1 connections on one anyio loop (its own process, so it does not
share a GIL with what it measures) send ``GET PATH`` back to back for SECONDS and report every
request's latency as JSON on stdout. SOCKET is a Unix socket path or ``tcp:HOST:PORT``;
HEADERS, a file of ``Name: value`` lines (a curl header file) sent with every request."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import anyio
import anyio.abc


async def main(path: str, target: str, clients: int, seconds: float, headers: str = "") -> None:
    extra = "".join(f"{line}\r\n" for line in headers.splitlines() if line.strip())
    request = f"GET {target} HTTP/1.1\r\nHost: imsd\r\n{extra}\r\n".encode()
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
        if path.startswith("tcp:"):
            host, port = path[4:].rsplit(":", 1)
            stream: anyio.abc.ByteStream = await anyio.connect_tcp(host, int(port))
        else:
            stream = await anyio.connect_unix(path)
        async with stream as s:
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
    header_file = sys.argv[5] if len(sys.argv) > 5 else ""
    extra = Path(header_file).read_text() if header_file else ""
    anyio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), extra)
