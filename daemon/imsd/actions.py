"""Per-credential ``on_refresh`` actions: tell a consumer that its token files changed.

A credential file may ask for one action, run after each new token's files are written::

    [on_refresh]
    signal = { pid_file = "/run/app/app.pid", signal = "HUP" }   # or:
    command = ["systemctl", "reload", "app.service"]
    timeout = 30                                                # seconds, commands only
    pass_env = ["DBUS_SYSTEM_BUS_ADDRESS"]                      # commands only

:func:`parse_action` is pure (a table in, an :class:`Action` or ValueError naming the field
out). :func:`run_action` does the I/O and never raises: a missing pid file, a dead process, a
failing or hanging command are logged and counted, and the token files stay as written. A
command runs without a shell and its output is discarded, so it cannot leak into the daemon's
logs. Its environment is built from scratch (:func:`action_environment`): the daemon's
environment holds every credential's ``client_secret_env`` value, ``NOTIFY_SOCKET`` and the
like, none of which a reload command needs. It gets ``IMSD_CREDENTIAL``, ``IMSD_OUTPUT_DIR``,
``IMSD_TOKEN_FILE`` (never the token itself), ``PATH``, the locale and ``TZ``, and the
variables the action names in ``pass_env``.

A pid file decides which process a (possibly root) daemon signals, so it is trusted only when
the daemon's uid or root owns it, nobody else can write it, and it is a regular file with one
link reached without a symlink; the process must belong to the file's owner (anything, for
root). Anything else is refused and logged.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import stat
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import anyio
import structlog

__all__ = ["Action", "action_environment", "parse_action", "run_action"]

log = structlog.get_logger("imsd.actions")

DEFAULT_TIMEOUT: Final = 30.0
MAX_TIMEOUT: Final = 600.0
#: What a command gets from the daemon's environment without asking (when set there).
BASE_ENV: Final = ("PATH", "LANG", "LC_ALL", "TZ")
DEFAULT_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class Action:
    signal: signal.Signals | None = None
    pid_file: Path | None = None
    command: tuple[str, ...] = ()
    timeout: float = DEFAULT_TIMEOUT
    pass_env: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.signal is not None:
            return f"signal {self.signal.name} to the pid in {self.pid_file}"
        return f"command {self.command[0]}"


def _signal(name: Any) -> signal.Signals:
    if not isinstance(name, str) or not name:
        raise ValueError("on_refresh.signal.signal: a signal name such as HUP")
    upper = name.upper()
    try:
        return signal.Signals[upper if upper.startswith("SIG") else "SIG" + upper]
    except KeyError:
        raise ValueError(f"on_refresh.signal.signal: unknown signal {name!r}") from None


def parse_action(table: Mapping[str, Any], base: Path) -> Action:
    """The action of an ``on_refresh`` table; relative paths are resolved against *base*
    (the credential file's directory)."""
    unknown = sorted(set(table) - {"signal", "command", "timeout", "pass_env"})
    if unknown:
        raise ValueError(
            f"on_refresh.{unknown[0]}: unknown field (signal, command, timeout, pass_env)"
        )
    if ("signal" in table) == ("command" in table):
        raise ValueError("on_refresh: give exactly one of signal or command")
    timeout = table.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise ValueError("on_refresh.timeout: a number of seconds")
    if not 0 < timeout <= MAX_TIMEOUT:
        raise ValueError(f"on_refresh.timeout: between 0 and {MAX_TIMEOUT:g} seconds")
    if "signal" in table:
        if "pass_env" in table:
            raise ValueError("on_refresh.pass_env: applies to command, not signal")
        spec = table["signal"]
        if not isinstance(spec, Mapping) or set(spec) != {"pid_file", "signal"}:
            raise ValueError('on_refresh.signal: { pid_file = "…", signal = "HUP" }')
        pid_file = spec["pid_file"]
        if not isinstance(pid_file, str) or not pid_file:
            raise ValueError("on_refresh.signal.pid_file: a path")
        return Action(signal=_signal(spec["signal"]), pid_file=base / pid_file)
    command = table["command"]
    if (
        not isinstance(command, list)
        or not command
        or not all(isinstance(a, str) and a and "\0" not in a for a in command)
    ):
        raise ValueError("on_refresh.command: a non-empty list of strings (no shell)")
    return Action(
        command=tuple(command), timeout=float(timeout), pass_env=_pass_env(table.get("pass_env"))
    )


def _pass_env(names: Any) -> tuple[str, ...]:
    if names is None:
        return ()
    if not isinstance(names, list) or not all(
        isinstance(n, str) and _ENV_NAME.fullmatch(n) for n in names
    ):
        raise ValueError("on_refresh.pass_env: a list of environment variable names")
    if len(set(names)) != len(names):
        raise ValueError("on_refresh.pass_env: lists a name twice")
    return tuple(names)


def action_environment(
    action: Action, *, credential: str, output_dir: Path, source: Mapping[str, str]
) -> dict[str, str]:
    """A command's whole environment: :data:`BASE_ENV` and the action's ``pass_env`` taken
    from *source* (the daemon's environment) when set there, then ours, which win."""
    env = {k: source[k] for k in (*BASE_ENV, *action.pass_env) if k in source}
    env.setdefault("PATH", DEFAULT_PATH)  # execvpe would fall back to a shorter one
    env.update(
        IMSD_CREDENTIAL=credential,
        IMSD_OUTPUT_DIR=str(output_dir),
        IMSD_TOKEN_FILE=str(output_dir / "token"),
    )
    return env


def pid_file_problem(st: os.stat_result, daemon_uid: int) -> str | None:
    """Why a pid file with stat *st* cannot be trusted by a daemon running as *daemon_uid*,
    or None. Whoever can write it chooses which process the daemon signals: only the
    daemon's own uid or root may own it, nobody else may write it, and a second hard link
    could be a file planted elsewhere by someone else."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid not in (daemon_uid, 0):
        return f"owned by uid {st.st_uid}, not by the daemon's uid ({daemon_uid}) or root"
    if st.st_mode & 0o022:
        return "writable by group or others"
    if st.st_nlink != 1:
        return "has more than one hard link"
    return None


def process_problem(pid: int, owner: int, uids: tuple[int, int]) -> str | None:
    """Why the pid file's *owner* may not have process *pid* (real and saved uid *uids*)
    signalled, or None: only what the owner could signal itself (kill(2)'s rule for an
    unprivileged sender), anything when the owner is root."""
    if owner == 0 or owner in uids:
        return None
    return f"process {pid} belongs to uid {uids[0]}, not to the pid file's owner (uid {owner})"


def process_uids(status: str) -> tuple[int, int]:
    """The real and saved uid in the text of ``/proc/PID/status``."""
    for line in status.splitlines():
        if line.startswith("Uid:"):
            real, _effective, saved, *_ = line.split()[1:]
            return int(real), int(saved)
    raise ValueError("no Uid line in the process status")


def _read_pid(path: Path, daemon_uid: int) -> tuple[int, int]:
    """The pid in the file at *path* and the file's owner, once the file passed
    :func:`pid_file_problem`."""
    # O_NOFOLLOW: a symlink would let whoever can write its directory name a file of ours;
    # O_NONBLOCK: a FIFO must not block the worker thread.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValueError(f"{path}: is a symlink; refusing") from None
        raise
    try:
        st = os.fstat(fd)
        problem = pid_file_problem(st, daemon_uid)
        if problem is not None:
            raise ValueError(f"{path}: {problem}; refusing")
        text = os.read(fd, 64).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    if not text.isdigit() or int(text) <= 1:
        raise ValueError(f"{path}: does not hold a process id")
    return int(text), st.st_uid


def _signal_from_pid_file(action: Action, daemon_uid: int) -> int:
    """Send the action's signal to the process its pid file names; the pid. Blocking."""
    assert action.pid_file is not None
    assert action.signal is not None
    pid, owner = _read_pid(action.pid_file, daemon_uid)
    # A pidfd pins the process: if the pid is reused after the check below, the signal goes
    # to the (dead) process that was checked, not to the newcomer.
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except OSError as e:
        if e.errno != errno.ENOSYS:
            raise
        pidfd = None
    try:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            raise ProcessLookupError(errno.ESRCH, os.strerror(errno.ESRCH)) from None
        problem = process_problem(pid, owner, process_uids(status))
        if problem is not None:
            raise ValueError(f"{action.pid_file}: {problem}; refusing")
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, action.signal)
        else:
            os.kill(pid, action.signal)
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return pid


async def run_action(
    action: Action, *, credential: str, output_dir: Path, env: Mapping[str, str] | None = None
) -> bool:
    """Run *action* for *credential*; True on success. Never raises (except cancellation).
    *env* is the daemon's environment, which a command's is drawn from (default
    ``os.environ``)."""
    if action.signal is not None:
        try:
            pid = await anyio.to_thread.run_sync(_signal_from_pid_file, action, os.geteuid())
        except (OSError, ValueError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            log.error(
                "on_refresh.failed", credential=credential, action=action.describe(), error=reason
            )
            return False
        log.info("on_refresh.signalled", credential=credential, pid=pid, signal=action.signal.name)
        return True
    return await _run_command(action, credential, output_dir, env)


async def _run_command(
    action: Action, credential: str, output_dir: Path, env: Mapping[str, str] | None
) -> bool:
    child_env = action_environment(
        action,
        credential=credential,
        output_dir=output_dir,
        source=os.environ if env is None else env,
    )
    error: str | None = None
    try:
        with anyio.fail_after(action.timeout):
            result = await anyio.run_process(
                list(action.command),
                check=False,
                env=child_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        if result.returncode != 0:
            error = f"exited with {result.returncode}"
    except TimeoutError:
        error = f"timed out after {action.timeout:g} s (killed)"
    except OSError as e:
        error = e.strerror or type(e).__name__
    if error is not None:
        log.error("on_refresh.failed", credential=credential, action=action.describe(), error=error)
        return False
    log.info("on_refresh.ran", credential=credential, action=action.describe())
    return True
