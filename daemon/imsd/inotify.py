"""Batches of changes in one directory from Linux inotify, on the event loop.

watchfiles (used elsewhere, and here when inotify is not available) hands the kernel's
events to Python through a thread that wakes every ``step`` milliseconds to look for them:
an idle daemon then spends most of its CPU on that thread (about 0.3 % of a core at a
20 ms step, measured per thread). Here the inotify descriptor itself is waited on
(``anyio.wait_readable``): nothing runs until the kernel has an event.

:class:`DirectoryChanges` yields ``True`` once a burst of changes has gone quiet for
*step_ms* (or has lasted *debounce_ms*), and ``False`` every *timeout_ms* without any, so the
caller can look at the directory's identity. It ends when the watched directory itself is
gone (deleted, moved away, unmounted): the caller starts a new watch on whatever is at the
path then.
Events only say "something changed": which files is left to the caller's re-scan.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import sys
from pathlib import Path
from typing import Final

import anyio

__all__ = ["DirectoryChanges", "available"]

_IN_NONBLOCK: Final = os.O_NONBLOCK
_IN_CLOEXEC: Final = os.O_CLOEXEC
#: Writes, metadata (a chmod can make a credential file valid or not), creations, removals,
#: renames in and out (an editor's save, a Secret volume's ``..data`` swap). Not opens or
#: reads: the re-scan's own reads must not trigger another one.
_MASK: Final = (
    0x002  # IN_MODIFY
    | 0x004  # IN_ATTRIB
    | 0x008  # IN_CLOSE_WRITE
    | 0x040  # IN_MOVED_FROM
    | 0x080  # IN_MOVED_TO
    | 0x100  # IN_CREATE
    | 0x200  # IN_DELETE
    | 0x400  # IN_DELETE_SELF
    | 0x800  # IN_MOVE_SELF
    | 0x01000000  # IN_ONLYDIR
)
#: The watched directory itself went away: this watch will see nothing more.
_GONE: Final = 0x400 | 0x800 | 0x2000 | 0x8000  # DELETE_SELF, MOVE_SELF, UNMOUNT, IGNORED
_HEADER: Final = struct.Struct("iIII")  # wd, mask, cookie, len (struct inotify_event)


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC: Final = _libc()


def available() -> bool:
    return _LIBC is not None


def _open(root: Path) -> int:
    assert _LIBC is not None
    fd: int = _LIBC.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"no inotify instance: {os.strerror(e)}")
    if _LIBC.inotify_add_watch(fd, os.fsencode(root), _MASK) < 0:
        e = ctypes.get_errno()
        os.close(fd)
        raise OSError(e, os.strerror(e), str(root))
    return fd


def _drain(fd: int) -> tuple[bool, bool]:
    """Read every pending event: (any event, the directory is gone)."""
    seen = gone = False
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return seen, gone
        except OSError as e:
            if e.errno == errno.EINTR:
                continue
            raise
        offset = 0
        while offset + _HEADER.size <= len(data):
            _wd, mask, _cookie, length = _HEADER.unpack_from(data, offset)
            offset += _HEADER.size + length
            seen = True  # IN_Q_OVERFLOW too: events were lost, so something changed
            gone = gone or bool(mask & _GONE)


async def _readable(fd: int, within: float) -> bool:
    with anyio.move_on_after(within):
        await anyio.wait_readable(fd)
        return True
    return False


class DirectoryChanges:
    """See the module docstring. The watch exists from construction on (a change made
    before the first ``anext`` is reported); :meth:`aclose` releases it. Raises OSError if
    *root* cannot be watched."""

    def __init__(self, root: Path, *, debounce_ms: int, step_ms: int, timeout_ms: int) -> None:
        self._fd = _open(root)
        self._debounce = debounce_ms / 1000
        self._step = step_ms / 1000
        self._timeout = timeout_ms / 1000
        self._gone = False

    def __aiter__(self) -> DirectoryChanges:
        return self

    async def __anext__(self) -> bool:
        if self._gone or self._fd < 0:
            raise StopAsyncIteration
        if not await _readable(self._fd, self._timeout):
            return False
        seen, self._gone = _drain(self._fd)
        if self._gone or not seen:
            return self._gone  # gone: look again (what it held is elsewhere), then stop
        deadline = anyio.current_time() + self._debounce
        while (left := deadline - anyio.current_time()) > 0:
            if not await _readable(self._fd, min(self._step, left)):
                break  # quiet for a step: the burst is over
            _, self._gone = _drain(self._fd)
            if self._gone:
                break
        return True

    async def aclose(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
