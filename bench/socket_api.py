"""Socket API: req/s and p50/p99 of ``GET /v1/credentials/NAME/token`` at 1, 16 and 64
concurrent keep-alive clients, against a raw h11-on-anyio server with a constant body of the
same size (``bench.baseline_server``), same load generator, same run. The two servers take
turns over several rounds and each figure is the median of its rounds: the load generator
shares two CPUs with the server, and a single round swung the 64-client ratio by ±0.15.
Goal: ≥ 70 % of the baseline's req/s; p99 ≤ 5 ms at 64 clients."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import Figure, daemon, new_root, percentile, running_fake, write_credential

NAME = "socket"
PATH = "/v1/credentials/bench/token"


def _load(sock: Path, clients: int, seconds: float) -> tuple[float, float, float]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.loadgen", str(sock), PATH, str(clients), str(seconds)],
        capture_output=True,
        check=True,
        timeout=seconds + 60,
    )
    result = json.loads(out.stdout)
    if result["errors"]:
        raise RuntimeError(f"load errors: {result['errors'][:3]}")
    lat = result["latencies"]
    return len(lat) / seconds, percentile(lat, 50) * 1e3, percentile(lat, 99) * 1e3


def _rounds(
    sock: Path, base_sock: Path, clients: int, seconds: float, rounds: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Alternate imsd and baseline rounds; the median (req/s, p50, p99) of each."""
    mine, theirs = [], []
    for _ in range(rounds):
        mine.append(_load(sock, clients, seconds))
        theirs.append(_load(base_sock, clients, seconds))

    def median(runs: list[tuple[float, float, float]]) -> tuple[float, ...]:
        return tuple(statistics.median(column) for column in zip(*runs, strict=True))

    return median(mine), median(theirs)


def run(quick: bool) -> list[Figure]:
    seconds = 1.0 if quick else 3.0
    rounds = 1 if quick else 5
    figures: list[Figure] = []
    with running_fake() as fake:
        root = new_root()
        write_credential(root / "creds", "bench", fake.url)
        with daemon(root) as d:
            size = len((d.tokens / "bench" / "token.json").read_bytes())
            base_sock = root / "baseline.sock"
            base = subprocess.Popen(
                [sys.executable, "-m", "bench.baseline_server", str(base_sock), str(size)]
            )
            try:
                while not base_sock.exists():
                    time.sleep(0.02)
                for clients in (1, 16, 64):
                    _load(d.socket, clients, 0.3)  # warm both
                    _load(base_sock, clients, 0.3)
                    (rps, p50, p99), (b_rps, b_p50, b_p99) = _rounds(
                        d.socket, base_sock, clients, seconds, rounds
                    )
                    goal = "≥ 0.70" if clients == 64 else ""
                    figures += [
                        Figure(
                            NAME, f"req/s, {clients} clients", rps, "req/s", b_rps, "raw h11", goal
                        ),
                        Figure(NAME, f"p50, {clients} clients", p50, "ms", b_p50, "raw h11"),
                        Figure(
                            NAME,
                            f"p99, {clients} clients",
                            p99,
                            "ms",
                            b_p99,
                            "raw h11",
                            "≤ 5 ms" if clients == 64 else "",
                        ),
                    ]
            finally:
                base.terminate()
                base.wait()
    return figures
