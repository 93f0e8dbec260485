"""Shared pieces of the benchmarks: figures and their table, the machine, and a real daemon
(subprocess, READY over a notify socket) against the fake IMS."""

from __future__ import annotations

import atexit
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imsd.fakeims.server import FakeIms

ORG = "0123456789ABCDEF01234567@AdobeOrg"
SECRET = "p8e-BenchSecret0123456789abcdefgh"  # noqa: S105 - the fake IMS's
SCOPES = ["openid", "AdobeID", "read_organizations"]
#: IMS requests in flight, for imsd and for the baselines alike (the daemon's default).
CONCURRENCY = 8


@dataclass(frozen=True, slots=True)
class Figure:
    bench: str
    metric: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_label: str = ""
    goal: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline == 0:
            return None
        return self.value / self.baseline


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu": cpu,
    }


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def _ratio(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r:.2f}" if r == 0 or abs(r) >= 0.1 else f"{r:.2g}"  # 0.0058, not 0.01


def table(figures: Sequence[Figure]) -> str:
    rows = [("bench", "metric", "imsd", "baseline", "ratio", "goal")]
    for f in figures:
        ratio = f.ratio
        rows.append(
            (
                f.bench,
                f.metric,
                f"{_fmt(f.value)} {f.unit}",
                f"{_fmt(f.baseline)} ({f.baseline_label})" if f.baseline is not None else "-",
                _ratio(ratio),
                f.goal,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_results(path: Path, figures: Sequence[Figure]) -> None:
    doc = {"machine": machine(), "figures": [{**asdict(f), "ratio": f.ratio} for f in figures]}
    path.write_text(json.dumps(doc, indent=2) + "\n")


# -- a real daemon against the fake IMS ------------------------------------------------------


@contextmanager
def running_fake(lifetime: float = 86400.0) -> Iterator[FakeIms]:
    with FakeIms.in_thread(token_lifetime=lifetime) as fake:
        fake.state.add_client("bench", secrets=[SECRET], scopes=SCOPES, org_id=ORG)
        yield fake


def write_credential(creds: Path, name: str, ims_url: str, extra: str = "") -> Path:
    secret = creds / "bench.secret"
    if not secret.exists():
        secret.write_text(SECRET)
    path = creds / f"{name}.toml"
    tmp = creds / f".{name}.tmp"
    tmp.write_text(
        f'client_id = "bench"\nclient_secret_file = "bench.secret"\norg_id = "{ORG}"\n'
        f'scopes = {json.dumps(SCOPES)}\nims_url = "{ims_url}"\n{extra}'
    )
    os.replace(tmp, path)
    return path


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    root: Path
    ready_after: float  # seconds from spawn to READY=1

    @property
    def tokens(self) -> Path:
        return self.root / "tokens"

    @property
    def socket(self) -> Path:
        return self.root / "imsd.sock"

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    def rss_kib(self, peak: bool = False) -> int:
        key = "VmHWM:" if peak else "VmRSS:"
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def new_root() -> Path:
    """A scratch root on tmpfs when there is one: production outputs live on tmpfs too
    (/run/imsd/tokens, a Memory emptyDir), where an fsync costs nothing."""
    shm = Path("/dev/shm")  # noqa: S108 - only a place for mkdtemp
    where = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    root = Path(tempfile.mkdtemp(prefix="imsd-bench-", dir=where))
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # tmpfs is memory: never leave it
    (root / "creds").mkdir()
    return root


@contextmanager
def daemon(
    root: Path,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    args: Sequence[str] = (),
) -> Iterator[Daemon]:
    """``imsd run`` on *root*/creds; returns once it sent READY=1."""
    notify = root / "notify.sock"
    notify.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(timeout)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("IMSD_", "NOTIFY_"))}
    environ.update(
        NOTIFY_SOCKET=str(notify),
        IMSD_REQUEST_RATE="",  # the global IMS rate limit lifted for benchmarks
        IMSD_MAX_CONCURRENT_REQUESTS=str(CONCURRENCY),
        IMSD_LOG_LEVEL="warning",
    )
    environ.update(env or {})
    argv = [
        sys.executable,
        "-m",
        "imsd",
        "run",
        "--credentials-dir",
        str(root / "creds"),
        "--output-dir",
        str(root / "tokens"),
        "--state-dir",
        str(root / "state"),
        "--socket",
        str(root / "imsd.sock"),
        "--metrics-address",
        "",
        *args,
    ]
    started = time.monotonic()
    proc = subprocess.Popen(argv, env=environ, stdout=subprocess.DEVNULL)
    try:
        while True:
            message = listener.recv(4096)
            if b"READY=1" in message:
                break
        d = Daemon(proc, root, time.monotonic() - started)
        listener.close()
        yield d
    finally:
        listener.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
