"""Restart: start → READY with N stored valid tokens, and the IMS requests it makes, against a
cold start of the same credentials in the same run. Goal: ≤ 1 s and 0 requests at 1,000."""

from __future__ import annotations

from bench.harness import Figure, daemon, new_root, running_fake, write_credential


def run(quick: bool) -> list[Figure]:
    n = 200 if quick else 1000
    with running_fake() as fake:
        root = new_root()
        for i in range(n):
            write_credential(root / "creds", f"c{i:05d}", fake.url)
        with daemon(root) as cold:
            cold_ready = cold.ready_after
        cold_requests = fake.state.request_count()
        with daemon(root) as warm:
            warm_ready = warm.ready_after
        warm_requests = fake.state.request_count() - cold_requests
    return [
        Figure("restart", f"start → READY, {n} stored tokens", warm_ready, "s", cold_ready,
               "cold start", "≤ 1 s"),
        Figure("restart", "IMS requests on restart", warm_requests, "req", cold_requests,
               "cold start", "0"),
    ]  # fmt: skip
