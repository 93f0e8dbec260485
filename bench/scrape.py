"""Scrapes against token reads: with 5,000 credentials, p50/p99 of ``GET
/v1/credentials/NAME/token`` on the socket (16 keep-alive clients) alone, then while 4
scrapers fetch ``/metrics`` back to back on the metrics listener (anyone on the host can),
each in its own process (``bench.loadgen``); also the scrapes/s they got. Baseline: the
reads without scrapers, same daemon, same run. Goal (issue 23 item 11): the scrapers leave the
p99 within 2 × the idle figure."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from typing import Any

from bench.harness import Figure, daemon, new_root, percentile, running_fake, write_credential

NAME = "scrape"
CREDENTIALS = 5000
READERS = 16
SCRAPERS = 4


_SCRAPER = """
import json, socket, sys, threading, time
port, n, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
latencies, errors, end = [], [], time.perf_counter() + seconds
request = b"GET /metrics HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n\\r\\n"
def scraper():
    buf = memoryview(bytearray(64 << 20))
    try:
        while time.perf_counter() < end:
            with socket.create_connection(("127.0.0.1", port)) as s:
                while time.perf_counter() < end:
                    t0 = time.perf_counter()
                    s.sendall(request)
                    head = b""
                    while b"\\r\\n\\r\\n" not in head:
                        head += s.recv(65536)
                    head, _, rest = head.partition(b"\\r\\n\\r\\n")
                    head = head.lower()
                    length = int(head.split(b"content-length: ")[1].split(b"\\r\\n")[0])
                    have = len(rest)
                    while have < length:  # read and discard in C: the scraper costs little CPU
                        have += s.recv_into(buf)
                    latencies.append(time.perf_counter() - t0)
                    if b"connection: close" in head:
                        break
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=scraper) for _ in range(n)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"latencies": latencies, "errors": errors, "seconds": seconds}))
"""


def _scrapers(port: int, n: int, seconds: float) -> subprocess.Popen[bytes]:
    """*n* scrapers of ``/metrics`` (threads in a process of their own), back to back on
    keep-alive connections; they read into a buffer and discard, so that the scrapers' own
    CPU does not take the daemon's cores."""
    argv = [sys.executable, "-c", _SCRAPER, str(port), str(n), str(seconds)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE)


def _loadgen(target: str, path: str, clients: int, seconds: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.loadgen", target, path, str(clients), str(seconds)],
        stdout=subprocess.PIPE,
    )


def _result(proc: subprocess.Popen[bytes], seconds: float) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=seconds + 120)
    result: dict[str, Any] = json.loads(out)
    if result["errors"]:
        raise RuntimeError(f"load errors: {result['errors'][:3]}")
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def measure(seconds: float, credentials: int = CREDENTIALS) -> dict[str, float]:
    with running_fake() as fake:
        root = new_root()
        for i in range(credentials):
            write_credential(root / "creds", f"c{i:05d}", fake.url)
        port = _free_port()
        with daemon(root, timeout=900, args=["--metrics-address", f"127.0.0.1:{port}"]) as d:
            sock, token = str(d.socket), "/v1/credentials/c00000/token"
            _result(_loadgen(sock, token, READERS, 0.5), 0.5)  # warm
            idle = _result(_loadgen(sock, token, READERS, seconds), seconds)["latencies"]
            scrapers = _scrapers(port, SCRAPERS, seconds + 1)
            busy = _result(_loadgen(sock, token, READERS, seconds), seconds)["latencies"]
            scrapes = _result(scrapers, seconds + 1)["latencies"]
    return {
        "idle_p50": percentile(idle, 50) * 1e3,
        "idle_p99": percentile(idle, 99) * 1e3,
        "busy_p50": percentile(busy, 50) * 1e3,
        "busy_p99": percentile(busy, 99) * 1e3,
        "scrapes_per_s": len(scrapes) / (seconds + 1),
        "scrape_p50": percentile(scrapes, 50) * 1e3,
    }


def run(quick: bool) -> list[Figure]:
    m = measure(2.0 if quick else 10.0, 1000 if quick else CREDENTIALS)
    what = f"{READERS} readers, {SCRAPERS} scrapers"
    return [
        Figure(NAME, f"token read p50, {what}", m["busy_p50"], "ms", m["idle_p50"], "no scrapers"),
        Figure(NAME, f"token read p99, {what}", m["busy_p99"], "ms", m["idle_p99"], "no scrapers",
               "≤ 2 × baseline"),
        Figure(NAME, f"scrapes/s, {what}", m["scrapes_per_s"], "1/s"),
        Figure(NAME, f"scrape p50, {what}", m["scrape_p50"], "ms"),
    ]  # fmt: skip


if __name__ == "__main__":  # python -m bench.scrape [SECONDS [CREDENTIALS]]
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    credentials = int(sys.argv[2]) if len(sys.argv) > 2 else CREDENTIALS
    print(json.dumps(measure(seconds, credentials)))
