"""Sharing: N = 1, 10, 100 consumer processes of one credential → IMS requests over a
simulated day, with imsd (the consumers read its token file) against the in-process pattern
(each consumer mints its own token at start and again whenever it has expired). The day is
compressed: token lifetime = 1 simulated day, consumers act once per simulated hour."""

from __future__ import annotations

import threading
import time

import httpx

from bench.harness import (
    ORG,
    SCOPES,
    SECRET,
    Figure,
    daemon,
    new_root,
    running_fake,
    write_credential,
)


def _in_process(url: str, n: int, day: float) -> None:
    """n consumers, each with its own cached token (the usual SDK pattern)."""
    form = {
        "grant_type": "client_credentials",
        "client_id": "inproc",
        "client_secret": SECRET,
        "scope": ",".join(SCOPES),
    }
    end = time.monotonic() + day

    def consumer() -> None:
        expires = 0.0
        with httpx.Client(base_url=url) as c:
            while time.monotonic() < end:
                if time.monotonic() >= expires:
                    r = c.post("/ims/token/v3", data=form)
                    r.raise_for_status()
                    expires = time.monotonic() + r.json()["expires_in"]
                time.sleep(day / 24)

    threads = [threading.Thread(target=consumer) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _with_imsd(root_tokens: str, n: int, day: float) -> None:
    end = time.monotonic() + day

    def consumer() -> None:
        while time.monotonic() < end:
            with open(root_tokens) as f:
                assert f.read()
            time.sleep(day / 24)

    threads = [threading.Thread(target=consumer) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def run(quick: bool) -> list[Figure]:
    day = 6.0 if quick else 24.0  # seconds per simulated day
    figures: list[Figure] = []
    for n in (1, 10, 100):
        with running_fake(lifetime=day) as fake:
            fake.state.add_client("inproc", secrets=[SECRET], scopes=SCOPES, org_id=ORG)
            root = new_root()
            write_credential(root / "creds", "shared", fake.url)
            # The refresh margin scaled with the day (10 min of 24 h).
            env = {"IMSD_MIN_MARGIN": f"{day * 600 / 86400:.3f}", "IMSD_RECHECK_INTERVAL": "0.2"}
            with daemon(root, env=env) as d:
                _with_imsd(str(d.tokens / "shared" / "token"), n, day)
            imsd_requests = fake.state.request_count("bench")
            _in_process(fake.url, n, day)
            own = fake.state.request_count("inproc")
        figures.append(
            Figure("sharing", f"IMS requests per day, {n} consumers", imsd_requests, "req",
                   own, "each mints its own")
        )  # fmt: skip
    return figures
