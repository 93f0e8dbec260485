"""Atomic token files: ``OUTPUT_DIR/NAME/{token, token.json, PRODUCT.headers, PRODUCT.env}``.

Every write creates a temporary file in the same directory with ``O_EXCL|O_NOFOLLOW`` and the
final mode already set, writes and fsyncs it, renames it over the target and fsyncs the
directory, so a reader sees the old content or the new, never a partial or empty file, and a
crash leaves at worst a stale ``.NAME.tmp-*`` that the next write or start-up removes. All
paths are opened relative to directory descriptors opened with ``O_NOFOLLOW``: a symlink
planted at a credential directory or a target file is refused, never followed.

These functions block; the daemon runs them in a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

from imsd.model import NAME_RE

__all__ = ["FileSink", "SinkError", "atomic_write"]

_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TMP: Final = re.compile(r"^\..+\.tmp-[0-9a-f]{16}$")
_OURS: Final = re.compile(r"^(token|token\.json|[A-Za-z0-9._-]+\.(headers|env))$")

#: The write seam: tests inject ENOSPC here.
write_fn: Callable[[int, bytes | memoryview], int] = os.write


class SinkError(OSError):
    """Writing an output failed; the message names the path, never the content."""


def _fail(path: str, e: OSError) -> SinkError:
    return SinkError(e.errno or errno.EIO, f"{path}: {os.strerror(e.errno or errno.EIO)}")


def atomic_write(
    dir_fd: int,
    name: str,
    data: bytes,
    *,
    mode: int = 0o600,
    gid: int | None = None,
    where: str = "",
) -> None:
    """Replace *name* in the directory *dir_fd* with *data*, atomically and durably."""
    label = f"{where}/{name}" if where else name
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISREG(st.st_mode):
            raise SinkError(errno.EEXIST, f"{label}: exists and is not a regular file; refusing")
    tmp = f".{name}.tmp-{secrets.token_hex(8)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, mode, dir_fd=dir_fd)
    except OSError as e:
        raise _fail(label, e) from None
    try:
        try:
            os.fchmod(fd, mode)  # the umask must not widen or narrow what was asked for
            if gid is not None:
                os.fchown(fd, -1, gid)
            view = memoryview(data)
            while view:
                view = view[write_fn(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise _fail(label, e) from None
    try:
        os.fsync(dir_fd)
    except OSError as e:
        raise _fail(label, e) from None


class FileSink:
    def __init__(
        self,
        output_dir: Path,
        *,
        file_mode: int = 0o600,
        file_group: int | None = None,
    ) -> None:
        self.output_dir = output_dir
        self.file_mode = file_mode
        self.file_group = file_group
        # Consumers that may read the files (mode 0640 + group) must be able to enter the dir.
        self.dir_mode = (
            0o700 | (0o050 if file_mode & 0o040 else 0) | (0o005 if file_mode & 0o004 else 0)
        )

    def _root_fd(self) -> int:
        self.output_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        return os.open(self.output_dir, _DIR_FLAGS)

    @staticmethod
    def _check(name: str) -> None:
        if not NAME_RE.match(name) or name in (".", ".."):
            raise SinkError(errno.EINVAL, f"invalid credential name {name!r}")

    def _credential_fd(self, root: int, name: str) -> int:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, self.dir_mode, dir_fd=root)
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=root)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise SinkError(
                    errno.ELOOP, f"{self.output_dir / name}: not a directory (symlink?); refusing"
                ) from None
            raise _fail(str(self.output_dir / name), e) from None
        os.fchmod(fd, self.dir_mode)
        if self.file_group is not None:
            os.fchown(fd, -1, self.file_group)
        return fd

    def write(self, name: str, files: Mapping[str, bytes]) -> None:
        """Write every file of credential *name*; remove our files it no longer produces."""
        self._check(name)
        root = self._root_fd()
        try:
            fd = self._credential_fd(root, name)
        finally:
            os.close(root)
        where = str(self.output_dir / name)
        try:
            for filename, data in files.items():
                atomic_write(
                    fd, filename, data, mode=self.file_mode, gid=self.file_group, where=where
                )
            for entry in os.listdir(fd):
                stale = _TMP.match(entry) or (_OURS.match(entry) and entry not in files)
                if stale:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry, dir_fd=fd)
        finally:
            os.close(fd)

    def remove(self, name: str) -> None:
        """Remove credential *name*'s directory: our files, then the directory if empty."""
        self._check(name)
        try:
            root = os.open(self.output_dir, _DIR_FLAGS)
        except FileNotFoundError:
            return
        try:
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=root)
            except FileNotFoundError:
                return
            except OSError as e:
                raise _fail(str(self.output_dir / name), e) from None
            try:
                for entry in os.listdir(fd):
                    if _OURS.match(entry) or _TMP.match(entry):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry, dir_fd=fd)
            finally:
                os.close(fd)
            try:
                os.rmdir(name, dir_fd=root)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.ENOENT):
                    raise _fail(str(self.output_dir / name), e) from None
        finally:
            os.close(root)

    def cleanup_orphans(self, keep: set[str]) -> list[str]:
        """At start-up: remove directories of credentials that no longer exist."""
        try:
            names = os.listdir(self.output_dir)
        except FileNotFoundError:
            return []
        removed = []
        for name in names:
            path = self.output_dir / name
            if name in keep or not NAME_RE.match(name) or path.is_symlink() or not path.is_dir():
                continue
            if any(not (_OURS.match(f) or _TMP.match(f)) for f in os.listdir(path)):
                continue  # not ours: leave a directory with foreign files alone
            self.remove(name)
            removed.append(name)
        return removed
