"""A real systemd as PID 1 for tests: a Debian rootfs built once with ``mmdebstrap`` and cached,
booted with ``systemd-nspawn -b`` on a throwaway overlay, entered with ``nsenter``.

The cache directory is ``$IMSD_CI_CACHE`` (``make test-long`` and ``.ci/run`` set it; default
``/var/cache/imsd-ci``). It holds the rootfs (``rootfs-bookworm-<key>``, about 260 MB, about a
minute to build) and the wheels of imsd's dependencies for the rootfs's Python
(``wheels-cp311-<key>``), each keyed by what it was built from and built under a lock, so a
change of package list or of dependencies builds a new one. The container has no network
(``--private-network``: loopback only), so pip inside installs from those wheels.

Facts of this environment (issue 21): no host systemd or machined, so ``--keep-unit
--register=no``, and ``nsenter -t <PID 1> -a`` instead of ``machinectl``/``systemd-run -M``;
SIGRTMIN+4 to PID 1 powers the container off; ``--volatile=overlay`` keeps every write of a run
in a tmpfs, so the cached rootfs is never changed and nothing is left to remove.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.requirements import need_tool

__all__ = ["Container", "booted", "cache_dir", "rootfs", "wheels"]

SUITE = "bookworm"
PYTHON = "3.11"  # bookworm's python3
GLIBC_MINOR = 36  # bookworm's glibc 2.36: the newest manylinux tag its Python accepts
PACKAGES = ("systemd", "systemd-sysv", "python3-venv", "sudo")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def cache_dir() -> Path:
    path = Path(os.environ.get("IMSD_CI_CACHE") or "/var/cache/imsd-ci")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    with (cache / ".lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _build(target: Path, argv: Sequence[str], what: str, timeout: float) -> Path:
    """*argv* writes into ``<target>.partial``, renamed to *target* when it succeeds."""
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    argv = [a.replace("{dest}", str(partial)) for a in argv]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if r.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        tail = "\n".join((r.stdout + r.stderr).splitlines()[-15:])
        pytest.fail(f"building {what} failed (exit {r.returncode}): {' '.join(argv)}\n{tail}")
    partial.rename(target)
    return target


def rootfs(cache: Path) -> Path:
    """The cached Debian rootfs with systemd, a Python with venv, and sudo."""
    target = cache / f"rootfs-{SUITE}-{_key('minbase', SUITE, *PACKAGES)}"
    with _locked(cache):
        if (target / "usr/lib/systemd/systemd").exists():
            return target
        tool = need_tool("mmdebstrap", "apt-get install mmdebstrap (.ci/run does)")
        argv = [tool, "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, "{dest}"]
        return _build(target, argv, f"the {SUITE} rootfs", timeout=900)


def wheels(cache: Path, requirements: Sequence[str]) -> Path:
    """Wheels of *requirements* and their dependencies for the rootfs's CPython, downloaded
    by the host's pip (the container has no network)."""
    arch = platform.machine()
    target = cache / f"wheels-cp{PYTHON.replace('.', '')}-{_key(arch, PYTHON, *requirements)}"
    with _locked(cache):
        if target.is_dir():
            return target
        # pip does not widen one manylinux tag to the older ones: every glibc up to bookworm's.
        plats = [f"--platform=manylinux_2_{m}_{arch}" for m in range(17, GLIBC_MINOR + 1)]
        argv = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", "{dest}"]
        argv += ["--only-binary=:all:", f"--python-version={PYTHON}", "--implementation=cp"]
        argv += [f"--abi=cp{PYTHON.replace('.', '')}", *plats, *requirements]
        return _build(target, argv, "the wheels", timeout=600)


@dataclass
class Container:
    """A booted container; :meth:`run` runs a shell script in it (as root, or as *user* in a
    fresh login: ``runuser -l``, so a group added since the last login counts)."""

    pid1: int
    console: Path

    def run(
        self,
        script: str,
        *,
        user: str | None = None,
        input: str | None = None,
        check: bool = True,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        argv = ["runuser", "-l", user, "-c", script] if user else ["sh", "-c", script]
        cmd = ["nsenter", "-t", str(self.pid1), "-a", "env", "-i", f"PATH={PATH}", *argv]
        r = subprocess.run(
            cmd, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and r.returncode != 0:
            who = f" as {user}" if user else ""
            pytest.fail(
                f"in the container{who}: {script}\nexit {r.returncode}\n{r.stdout}{r.stderr}"
            )
        return r

    def out(self, script: str, **options: object) -> str:
        return self.run(script, **options).stdout  # type: ignore[arg-type]


def _init(pid: int) -> int | None:
    """The container's PID 1 under nspawn *pid*, once its systemd listens for systemctl."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for child in children:
            status = Path(f"/proc/{child}/status").read_text()
            nspid = next(line for line in status.splitlines() if line.startswith("NSpid:"))
            if (
                nspid.split()[-1] == "1"
                and Path(f"/proc/{child}/root/run/systemd/private").exists()
            ):
                return int(child)
    except (OSError, StopIteration):
        pass  # the child is being set up, or has exited (the caller checks nspawn)
    return None


@contextlib.contextmanager
def booted(root: Path, binds: Mapping[Path, str], console: Path) -> Iterator[Container]:
    """*root* booted on an overlay (its writes in a tmpfs), each of *binds* mounted read-only
    at its path inside; the boot console goes to *console*. Powered off at the end."""
    nspawn = need_tool("systemd-nspawn", "apt-get install systemd-container (.ci/run does)")
    need_tool("nsenter", "apt-get install util-linux")
    argv = [nspawn, "--quiet", "-D", str(root), "--volatile=overlay", "--keep-unit"]
    argv += ["--register=no", "--private-network", "-b", f"--machine=imsd-{os.getpid()}"]
    argv += [f"--bind-ro={src}:{dst}" for src, dst in binds.items()]
    with console.open("w") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    pid1 = None
    try:
        deadline = time.monotonic() + 30
        while (pid1 := _init(proc.pid)) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"systemd-nspawn did not start:\n{console.read_text()[-3000:]}")
            time.sleep(0.05)  # polling /proc: no event tells the host that PID 1 is up
        c = Container(pid1, console)
        # is-system-running --wait answers once boot is over (or failed): no polling.
        state = c.run("systemctl is-system-running --wait", check=False).stdout.strip()
        if state != "running":
            failed = c.out("systemctl --failed --no-legend --plain", check=False)
            pytest.fail(f"the container booted {state!r}; failed units:\n{failed}")
        yield c
    finally:
        if pid1 is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid1, signal.SIGRTMIN + 4)  # systemd's poweroff
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
