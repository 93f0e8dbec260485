"""Scale: N credentials (1,000, 10,000 and 100,000) → time until every token is on disk
(READY), the daemon's peak RSS over the whole run (VmHWM after the idle minute) and per
credential above an empty daemon, CPU seconds, then idle CPU over the minute after READY;
baseline: a bare httpx loop making the same N token requests with the same concurrency
against the same fake IMS (tokens live a day, so nothing refreshes during the run).
Goals at 10,000: ≤ 1.25 × the loop, ≤ 150 MB, idle ≤ 0.5 % of a core."""

from __future__ import annotations

import json
import shutil
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


def _empty_hwm_kib() -> int:
    """The empty daemon's high-water mark: what each credential costs is measured above it."""
    root = new_root()
    try:
        with daemon(root) as d:
            time.sleep(1.0)  # an idle moment after READY before reading its peak
            return d.rss_kib(peak=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(quick: bool) -> list[Figure]:
    sizes = (200, 1000) if quick else (1000, 10_000, 100_000)
    idle_window = 5.0 if quick else 60.0
    figures: list[Figure] = []
    empty_kib = _empty_hwm_kib()
    per_credential: dict[int, float] = {}
    for n in sizes:
        with running_fake() as fake:
            root = new_root()
            for i in range(n):
                write_credential(root / "creds", f"c{i:06d}", fake.url)
            with daemon(root, timeout=1800) as d:
                ready = d.ready_after
                cpu = d.cpu_seconds()
                written = sum(1 for _ in d.tokens.glob("*/token"))
                assert written == n, f"{written} of {n} tokens on disk at READY"
                idle = None
                if n >= sizes[1]:
                    # The idle minute right after READY: the follow-up scan of files written
                    # just before start, the first state save and the status lines run here.
                    time.sleep(2.0)  # let start-up work settle
                    c0, t0 = d.cpu_seconds(), time.monotonic()
                    time.sleep(idle_window)
                    idle = (d.cpu_seconds() - c0) / (time.monotonic() - t0) * 100
                hwm_kib = d.rss_kib(peak=True)  # the whole run: start, READY, idle minute
            shutil.rmtree(root, ignore_errors=True)
            base = _baseline(fake.url, n)
        per_credential[n] = ready / n
        goal = n == 10_000
        figures += [
            Figure("scale", f"{n:,} credentials: all tokens on disk", ready, "s", base["wall"],
                   "bare httpx loop", "≤ 1.25 × baseline" if goal else ""),
            Figure("scale", f"{n:,} credentials: peak RSS (VmHWM, whole run)", hwm_kib / 1024,
                   "MB", base["rss_kib"] / 1024, "bare httpx loop", "≤ 150 MB" if goal else ""),
            Figure("scale", f"{n:,} credentials: RSS per credential above the empty daemon",
                   (hwm_kib - empty_kib) * 1024 / n / 1024, "KiB", None, ""),
            Figure("scale", f"{n:,} credentials: CPU", cpu, "s", base["cpu"], "bare httpx loop"),
        ]  # fmt: skip
        if idle is not None:
            figures.append(
                Figure("scale", f"{n:,} credentials: idle CPU over {idle_window:g} s", idle,
                       "% of a core", None, "", "≤ 0.5 %" if goal else "")
            )  # fmt: skip
    small, large = sizes[-2], sizes[-1]
    figures.append(  # linear: the same time per credential at 10× the credentials
        Figure("scale", f"time per credential, {large:,} vs {small:,}",
               per_credential[large] * 1000, "ms", per_credential[small] * 1000,
               f"at {small:,}", "≈ 1 (nothing quadratic)")
    )  # fmt: skip
    return figures
