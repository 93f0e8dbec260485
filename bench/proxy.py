"""Proxy: ``GET`` requests through the authenticating proxy (``[[proxy]]`` on a Unix socket) to
a loopback upstream (the fake gateway's streaming stand-in, :mod:`imsd.fakeims.bulk`, which
checks the headers Adobe checks), against the same requests sent straight to that upstream
with the instance's header file, same load generator, same run, at 1 and 64 keep-alive
clients; then a 100 MB download and upload through the proxy against the same transfers
direct: MB/s and the daemon's RSS growth while streaming.
Goals: p50 overhead ≤ 0.5 ms at 1 client; ≥ 60 % of direct req/s at 64 clients; RSS flat."""

from __future__ import annotations

import hashlib
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import httpx
from imsd.fakeims.bulk import BulkApi
from imsd.fakeims.state import FakeImsState

from bench.harness import (
    ORG,
    SECRET,
    Figure,
    daemon,
    new_root,
    percentile,
    running_fake,
    write_credential,
)

#: The entitlement the fake gateway wants in a token (a product profile's scope).
SCOPES = ["openid", "AdobeID", "read_organizations", "additional_info.projectedProductContext"]
PATH = "/data/foundation/catalog/datasets"  # the gateway's own 200 answer, a small JSON body
MB = 1024 * 1024


@contextmanager
def _upstream(state: FakeImsState) -> Iterator[BulkApi]:
    """The streaming upstream on its own event loop in a thread of this process (it checks
    tokens against the fake IMS's state)."""
    api = BulkApi(state)
    ready, stop = threading.Event(), threading.Event()

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(api.serve)
            ready.set()
            await anyio.to_thread.run_sync(stop.wait)
            tg.cancel_scope.cancel()

    thread = threading.Thread(target=anyio.run, args=(main,), daemon=True)
    thread.start()
    ready.wait(30)
    try:
        yield api
    finally:
        stop.set()
        thread.join(30)


def _load(
    target: str, path: str, clients: int, seconds: float, headers: Path | None
) -> tuple[float, float, float]:
    argv = [sys.executable, "-m", "bench.loadgen", target, path, str(clients), str(seconds)]
    if headers is not None:
        argv.append(str(headers))
    out = subprocess.run(argv, capture_output=True, check=True, timeout=seconds + 60)
    result = json.loads(out.stdout)
    if result["errors"]:
        raise RuntimeError(f"load errors: {result['errors'][:3]}")
    lat = result["latencies"]
    return len(lat) / seconds, percentile(lat, 50) * 1e3, percentile(lat, 99) * 1e3


def _median(runs: list[tuple[float, float, float]]) -> tuple[float, ...]:
    return tuple(statistics.median(column) for column in zip(*runs, strict=True))


def _transfer(client: httpx.Client, url: str, size: int, headers: dict[str, str]) -> float:
    """Seconds for a *size* download then an upload of the same size (digest checked)."""
    t0 = time.perf_counter()
    with client.stream("GET", f"{url}/_fake/download", params={"size": size}, headers=headers) as r:
        r.raise_for_status()
        got = sum(len(chunk) for chunk in r.iter_raw())
    assert got == size, (got, size)
    block = bytes(range(256)) * 256  # 64 KiB
    body = iter([block] * (size // len(block)))
    r = client.post(f"{url}/_fake/upload", content=body, headers=headers)
    r.raise_for_status()
    digest = hashlib.sha256(block * (size // len(block))).hexdigest()
    assert r.json() == {"bytes": size, "sha256": digest}, r.text
    return time.perf_counter() - t0


def _headers(path: Path) -> dict[str, str]:
    return dict(
        (k.strip(), v.strip())
        for k, _, v in (line.partition(":") for line in path.read_text().splitlines())
        if k.strip()
    )


def run(quick: bool) -> list[Figure]:
    seconds = 1.0 if quick else 3.0
    rounds = 1 if quick else 5
    size = (10 if quick else 100) * MB
    figures: list[Figure] = []
    with running_fake() as fake, _upstream(fake.state) as upstream:
        fake.state.add_client("proxybench", secrets=[SECRET], scopes=SCOPES, org_id=ORG)
        root = new_root()
        base = f"{upstream.url}/gateway/aep"
        write_credential(root / "creds", "bench", fake.url, 'products = ["aep"]\n')
        cred = root / "creds" / "bench.toml"
        cred.write_text(
            cred.read_text()
            .replace('client_id = "bench"', 'client_id = "proxybench"')
            .replace(json.dumps(["openid", "AdobeID", "read_organizations"]), json.dumps(SCOPES))
            + f'[product.aep]\nbase_url = "{base}/"\n'
        )
        sock = root / "proxy.sock"
        config = root / "imsd.toml"
        config.write_text(f'[[proxy]]\nlisten = "{sock}"\ncredential = "bench"\nproduct = "aep"\n')
        with daemon(root, args=["--config", str(config)]) as d:
            header_file = d.tokens / "bench" / "aep.headers"
            direct = f"tcp:{upstream.url.removeprefix('http://')}"
            for clients in (1, 64):
                mine, theirs = [], []
                for _ in range(rounds):
                    mine.append(_load(str(sock), PATH, clients, seconds, None))
                    theirs.append(
                        _load(direct, f"/gateway/aep{PATH}", clients, seconds, header_file)
                    )
                (rps, p50, p99), (brps, bp50, bp99) = _median(mine), _median(theirs)
                label = "direct to the upstream"
                figures += [
                    Figure("proxy", f"req/s, {clients} clients", rps, "req/s", brps, label,
                           "≥ 0.60" if clients == 64 else ""),
                    Figure("proxy", f"p50, {clients} clients", p50, "ms", bp50, label,
                           "overhead ≤ 0.5 ms" if clients == 1 else ""),
                    Figure("proxy", f"p99, {clients} clients", p99, "ms", bp99, label),
                ]  # fmt: skip
            # 100 MB each way: through the proxy (its RSS sampled), then direct.
            transport = httpx.HTTPTransport(uds=str(sock))
            headers = _headers(header_file)
            rss0, peak, done = d.rss_kib(), [0], threading.Event()

            def sample() -> None:  # VmHWM holds start-up's peak: sample VmRSS instead
                while not done.wait(0.01):
                    peak[0] = max(peak[0], d.rss_kib())

            sampler = threading.Thread(target=sample)
            sampler.start()
            try:
                with httpx.Client(transport=transport, timeout=120) as c:
                    via = _transfer(c, "http://proxy", size, {})
            finally:
                done.set()
                sampler.join()
            growth = max(0, peak[0] - rss0) / 1024
            with httpx.Client(timeout=120) as c:
                straight = _transfer(c, base, size, headers)
        mb = 2 * size / MB
        figures += [
            Figure("proxy", f"{size // MB} MB down + up: throughput", mb / via, "MB/s",
                   mb / straight, "direct to the upstream"),
            Figure("proxy", f"{size // MB} MB down + up: daemon peak RSS growth", growth, "MB",
                   None, "", "flat"),
        ]  # fmt: skip
    return figures
