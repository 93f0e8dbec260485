"""Scale: N credentials (1,000 and 10,000) → time until every token is on disk (READY), peak
RSS and CPU seconds of the daemon, then its idle CPU; baseline: a bare httpx loop making the
same N token requests with the same concurrency against the same fake IMS.
Goals at 10,000: ≤ 10 s, ≤ 200 MB RSS, idle ≤ 1 % of a core."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from bench.harness import (
    CONCURRENCY,
    SCOPES,
    SECRET,
    Figure,
    daemon,
    new_root,
    running_fake,
    write_credential,
)

_HTTPX_LOOP = """
import json, resource, sys, time, anyio, httpx
url, n, conc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
form = {"grant_type": "client_credentials", "client_id": "bench", "client_secret": sys.argv[4],
        "scope": sys.argv[5]}
async def main():
    limit = anyio.Semaphore(conc)
    async with httpx.AsyncClient(base_url=url) as c, anyio.create_task_group() as tg:
        async def one():
            async with limit:
                r = await c.post("/ims/token/v3", data=form)
                r.raise_for_status()
                r.json()["access_token"]
        for _ in range(n):
            tg.start_soon(one)
t0 = time.monotonic()
anyio.run(main)
wall = time.monotonic() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss_kib": ru.ru_maxrss}))
"""


def _baseline(url: str, n: int) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _HTTPX_LOOP,
            url,
            str(n),
            str(CONCURRENCY),
            SECRET,
            ",".join(SCOPES),
        ],
        capture_output=True,
        check=True,
        timeout=900,
    )
    result: dict[str, float] = json.loads(out.stdout)
    return result


def run(quick: bool) -> list[Figure]:
    sizes = (200, 1000) if quick else (1000, 10_000)
    idle_window = 5.0 if quick else 60.0
    figures: list[Figure] = []
    for n in sizes:
        with running_fake() as fake:
            root = new_root()
            for i in range(n):
                write_credential(root / "creds", f"c{i:05d}", fake.url)
            with daemon(root) as d:
                ready = d.ready_after
                rss_mb = d.rss_kib(peak=True) / 1024
                cpu = d.cpu_seconds()
                written = sum(1 for _ in d.tokens.glob("*/token"))
                assert written == n, f"{written} of {n} tokens on disk at READY"
                if n == sizes[-1]:
                    time.sleep(2.0)  # let start-up work settle
                    c0, t0 = d.cpu_seconds(), time.monotonic()
                    time.sleep(idle_window)
                    idle = (d.cpu_seconds() - c0) / (time.monotonic() - t0) * 100
            base = _baseline(fake.url, n)
        goal = n >= 10_000
        figures += [
            Figure("scale", f"{n:,} credentials: all tokens on disk", ready, "s", base["wall"],
                   "bare httpx loop", "≤ 10 s" if goal else ""),
            Figure("scale", f"{n:,} credentials: peak RSS", rss_mb, "MB",
                   base["rss_kib"] / 1024, "bare httpx loop", "≤ 200 MB" if goal else ""),
            Figure("scale", f"{n:,} credentials: CPU", cpu, "s", base["cpu"], "bare httpx loop"),
        ]  # fmt: skip
    figures.append(
        Figure("scale", f"idle CPU over {idle_window:g} s ({sizes[-1]:,} credentials)", idle,
               "% of a core", None, "", "≤ 1 %")
    )  # fmt: skip
    return figures
