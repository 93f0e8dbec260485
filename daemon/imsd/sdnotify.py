"""systemd integration without libsystemd: sd_notify datagrams, the watchdog, and socket
activation (``LISTEN_FDS``). Every function is a no-op outside systemd (Kubernetes, a shell).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Mapping
from typing import Final

__all__ = ["SD_LISTEN_FDS_START", "listen_fds", "notify", "watchdog_interval"]

SD_LISTEN_FDS_START: Final = 3


def notify(*fields: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``READY=1``-style fields to ``$NOTIFY_SOCKET``; False when not under systemd."""
    env = os.environ if env is None else env
    addr = env.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]  # abstract namespace
    elif addr[0] != "/":
        raise OSError(errno.EAFNOSUPPORT, f"unsupported NOTIFY_SOCKET {addr!r}")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall("\n".join(fields).encode())
    except OSError:
        return False  # the manager went away: never fatal for the daemon
    return True


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or None when the
    watchdog is off or meant for another process."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


def listen_fds(env: Mapping[str, str] | None = None) -> list[socket.socket]:
    """Sockets passed by systemd socket activation, in order. Only for our own pid."""
    env = os.environ if env is None else env
    if env.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    out = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        out.append(socket.socket(fileno=fd))
    return out
