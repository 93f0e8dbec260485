from __future__ import annotations

import functools
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, settings
from imsd.config import Settings
from imsd.daemon import Daemon
from imsd.fakeims.server import FakeIms
from imsd.registry import load_registry

from tests.support import add_standard_clients, make_settings

# Shared 2-core CI machines run the suite's real servers beside hypothesis: no per-example
# deadline (no timing assertions in unit tests) and no "too slow" health check.
settings.register_profile(
    "imsd", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=100
)
settings.load_profile("imsd")


@pytest.fixture
def anyio_backend() -> str:
    # Integration tests run on asyncio; modules that pin trio compatibility override this.
    return "asyncio"


# -- the fake IMS and a running daemon ------------------------------------------------------
# Helpers without setup and teardown (credentials, settings, wait_for...) are in tests/support.py.
# A module whose tests need other fake-IMS clients defines its own ``fake`` and says why.


@pytest.fixture
def fake() -> Iterator[FakeIms]:
    """The fake IMS over loopback HTTP, in a thread, with the standard clients
    (``support.add_standard_clients``)."""
    with FakeIms.in_thread() as f:
        add_standard_clients(f)
        yield f


@pytest.fixture
async def daemon() -> AsyncIterator[Callable[..., Awaitable[Daemon]]]:
    """``await daemon(settings, **options)`` starts a daemon in process (options: ``env``,
    ``reload``, ``clock`` as for ``Daemon``, and ``handle_signals``); each one started is
    stopped at the end of the test."""
    async with anyio.create_task_group() as tg:

        async def start(
            settings: Settings, *, handle_signals: bool = False, **options: Any
        ) -> Daemon:
            d = Daemon(settings, load_registry(), **options)
            await tg.start(functools.partial(d.run, handle_signals=handle_signals))
            return d

        yield start
        tg.cancel_scope.cancel()


@pytest.fixture
def running(
    tmp_path: Path, daemon: Callable[..., Awaitable[Daemon]]
) -> Callable[..., Awaitable[Daemon]]:
    """``await running(**overrides)`` starts a daemon on ``make_settings(tmp_path, **overrides)``
    with an empty environment unless ``env`` is given (``reload``, ``clock`` and
    ``handle_signals`` as for ``daemon``)."""

    async def start(
        env: dict[str, str] | None = None,
        reload: Callable[[], Settings] | None = None,
        handle_signals: bool = False,
        clock: Callable[[], float] = time.time,
        **overrides: Any,
    ) -> Daemon:
        settings = make_settings(tmp_path, **overrides)
        return await daemon(
            settings, env=env or {}, reload=reload, clock=clock, handle_signals=handle_signals
        )

    return start


# -- a run leaves nothing behind ------------------------------------------------------------

_DEMO_GLOB = "imsd-demo-*"


def _demo_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob(_DEMO_GLOB))


def _processes_mentioning(needle: str) -> list[str]:
    """Live processes (not this one) whose command line names *needle*."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in argv:
            found.append(f"{proc.name}: {argv.strip()[:160]}")
    return found


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_DEMO_KEY] = _demo_dirs()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a test left a process or a demo directory behind (a secret, tokens)."""
    if not hasattr(session.config, "_tmp_path_factory"):
        return
    base = str(session.config._tmp_path_factory.getbasetemp())
    deadline = time.monotonic() + 5  # a process told to stop may take a moment
    while (left := _processes_mentioning(base)) and time.monotonic() < deadline:
        time.sleep(0.1)  # a synchronous hook polling /proc: other processes, no event to await
    none: set[Path] = set()
    before = session.config.stash.get(_DEMO_KEY, none)
    # Under pytest-xdist a worker would see another worker's demo still running: the
    # controller, which finishes last, checks the directories (and its base temp, which
    # holds every worker's, the processes).
    worker = hasattr(session.config, "workerinput")
    new_dirs = [] if worker else sorted(_demo_dirs() - before)
    if left or new_dirs:
        report = ["tests left things behind:", *left, *map(str, new_dirs)]
        print("\n" + "\n".join(report), file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_DEMO_KEY = pytest.StashKey[set[Path]]()
