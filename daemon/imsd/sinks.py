"""Atomic token files: ``OUTPUT_DIR/NAME/{token, token.json, PRODUCT.headers, PRODUCT.env}``.

Theory of operation. Every write creates a temporary ``.FILE.tmp-RANDOM`` in the same
directory with ``O_EXCL|O_NOFOLLOW`` and the final mode already set (``fchmod``, so the umask
cannot widen or narrow it), writes and fsyncs it, renames it over the target and fsyncs the
directory. A reader therefore sees the old content or the new, never a partial or empty file,
and a crash leaves at worst a stale temporary that the next write or start-up removes. On any
failure the temporary is unlinked and the old file is left untouched.

Everything below the output directory is reached through directory descriptors opened with
``O_NOFOLLOW``: a symlink planted at a credential directory or at a target file is refused,
never followed, and only regular files with our names are ever deleted, so a directory shared
with other files loses nothing that is not ours. The output directory itself is the operator's
choice and may be a symlink.

One writer per credential at a time (the supervisor runs one loop per credential): a write
removes stale temporaries, including those of a concurrent write to the same credential.
These functions block. The daemon runs them in a worker thread, except on a memory
filesystem (tmpfs, ramfs: ``/run``, a Kubernetes ``emptyDir`` of medium Memory), where a write
is a few syscalls that never wait for a device and the thread hop costs more than the write:
every syscall in the worker hands the GIL back and forth with the event loop (at 3,000
credentials that made 1.3 ms of CPU per credential, three times the write itself).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

import structlog

from imsd.model import NAME_RE

__all__ = [
    "FileSink",
    "SinkError",
    "atomic_write",
    "check_owner",
    "filesystem_type",
    "make_dirs",
    "mount_type",
    "open_private_dir",
    "remove_stale_temporaries",
]

log = structlog.get_logger("imsd.sinks")

_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TMP: Final = re.compile(r"\..+\.tmp-[0-9a-f]{16}")
_OURS: Final = re.compile(r"token|token\.json|\.imsd-templates|[A-Za-z0-9._-]+\.(headers|env)")
# Template outputs (README "Templates") have names of the user's choosing, which no pattern
# can tell from a foreign file: the credential directory's manifest lists them, one a line,
# so that removal and start-up clean-up know them as ours.
_MANIFEST: Final = ".imsd-templates"
_LISTABLE: Final = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
_MEMORY_FS: Final = frozenset({"tmpfs", "ramfs"})

#: The write seam: tests inject ENOSPC here.
write_fn: Callable[[int, bytes | memoryview], int] = os.write


def _listed(dir_fd: int) -> frozenset[str]:
    """The template outputs the manifest in *dir_fd* lists (nothing if it is missing or not
    a regular file)."""
    try:
        fd = os.open(
            _MANIFEST, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except OSError:
        return frozenset()
    try:
        st = os.fstat(fd)
        data = os.read(fd, 65536) if stat.S_ISREG(st.st_mode) else b""
    finally:
        os.close(fd)
    names = data.decode("utf-8", "replace").splitlines()
    return frozenset(n for n in names if _LISTABLE.fullmatch(n) and not _OURS.fullmatch(n))


class SinkError(OSError):
    """Writing or removing an output failed; the message names the path, never the content."""


def _fail(path: str, e: OSError) -> SinkError:
    code = e.errno or errno.EIO
    return SinkError(code, f"{path}: {os.strerror(code)}")


def check_owner(fd: int, where: str) -> os.stat_result:
    """The stat of directory *fd*, or SinkError if another non-root user owns it: a
    directory planted where ours belongs is refused, never adopted (chmod-ed, written to)."""
    st = os.fstat(fd)
    if st.st_uid not in (0, os.geteuid()):
        raise SinkError(
            errno.EPERM, f"{where}: owned by uid {st.st_uid}, not by imsd or root; refusing"
        )
    return st


def make_dirs(path: Path, mode: int) -> list[Path]:
    """Create *path* and its missing parents with exactly *mode*, whatever the umask
    (``Path.mkdir(parents=True)`` gives parents ``0777 & ~umask``: 0777 under ``umask 000``).
    Only directories created here are chmod-ed, through a descriptor that refuses a symlink
    swapped in meanwhile; existing ones (the operator's, a symlink) are left as they are.
    Returns the directories created."""
    missing: list[Path] = []
    here = Path(os.path.abspath(path))
    while not os.path.lexists(here) and here != here.parent:
        missing.append(here)
        here = here.parent
    created: list[Path] = []
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            continue  # made by someone else meanwhile: not ours to chmod
        except OSError as e:
            raise _fail(str(d), e) from None
        try:
            fd = os.open(d, _DIR_FLAGS)
        except OSError as e:
            raise _fail(str(d), e) from None
        try:
            if os.fstat(fd).st_uid == os.geteuid():
                os.fchmod(fd, mode)
        except OSError as e:
            raise _fail(str(d), e) from None
        finally:
            os.close(fd)
        created.append(d)
    return created


def open_private_dir(path: Path, mode: int) -> int:
    """A descriptor of directory *path*, created (with its parents) at *mode* if missing.
    A symlink at *path* is refused, never followed; so is a directory owned by another
    non-root user; one we own is brought to *mode* through the descriptor."""
    make_dirs(path, mode)
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise SinkError(
                errno.ELOOP, f"{path}: not a directory (a symlink?); refusing"
            ) from None
        raise _fail(str(path), e) from None
    try:
        st = check_owner(fd, str(path))
        if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
    except OSError as e:
        os.close(fd)
        raise e if isinstance(e, SinkError) else _fail(str(path), e) from None
    return fd


def _is_ours(entry: str) -> bool:
    return bool(_OURS.fullmatch(entry) or _TMP.fullmatch(entry))


def _unlink_regular(dir_fd: int, entry: str) -> bool:
    """Unlink *entry* if it is a regular file; anything else (a planted symlink, a directory)
    is left alone."""
    try:
        st = os.stat(entry, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            return False
        os.unlink(entry, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def remove_stale_temporaries(directory: Path, name: str) -> list[str]:
    """At start-up: remove the temporaries :func:`atomic_write` left for *name* in
    *directory* (a kill between create and rename), regular files only. Never during a
    write to that file: its temporary would go. Never raises; returns what it removed."""
    pattern = re.compile(re.escape(f".{name}.tmp-") + "[0-9a-f]{16}")
    try:
        fd = os.open(directory, _DIR_FLAGS)
    except FileNotFoundError:
        return []
    except OSError as e:
        log.warning("sink.cleanup_failed", path=str(directory), error=e.strerror)
        return []
    removed: list[str] = []
    try:
        for entry in os.listdir(fd):
            if pattern.fullmatch(entry) and _unlink_regular(fd, entry):
                removed.append(entry)
    except OSError as e:
        log.warning("sink.cleanup_failed", path=str(directory), error=e.strerror)
    finally:
        os.close(fd)
    if removed:
        log.info("sink.stale_removed", path=str(directory), files=removed)
    return removed


def atomic_write(
    dir_fd: int,
    name: str,
    data: bytes,
    *,
    mode: int = 0o600,
    gid: int | None = None,
    where: str = "",
    sync_dir: bool = True,
    skip_unchanged: bool = False,
    absent: bool = False,
) -> bool:
    """Replace *name* in the directory *dir_fd* with *data*, atomically and durably.

    *where* (the directory's path) only makes error messages readable. Raises
    :class:`SinkError` if *name* exists and is not a regular file (a symlink is never
    followed nor replaced) or on any I/O error; the old file is then untouched. With
    *skip_unchanged*, a file that already holds *data* with the right mode and group is left
    alone (a restart rewrites nothing). With ``sync_dir=False`` the caller fsyncs the
    directory (once for several files). *absent*: the caller just created the directory,
    private to us, so *name* cannot exist there (no stat). Returns whether the file was
    written.
    """
    label = f"{where}/{name}" if where else name
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise SinkError(errno.EINVAL, f"{label!r}: invalid file name")
    try:
        st = None if absent else os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise _fail(label, e) from None
    if st is not None:
        if not stat.S_ISREG(st.st_mode):
            raise SinkError(errno.EEXIST, f"{label}: exists and is not a regular file; refusing")
        if skip_unchanged and _holds(dir_fd, name, st, data, mode, gid):
            return False
    # What secrets.token_hex(8) returns, one call less (four files per credential written).
    tmp = f".{name}.tmp-{os.urandom(8).hex()}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, mode, dir_fd=dir_fd)
    except OSError as e:
        raise _fail(label, e) from None
    renamed = False
    try:
        try:
            os.fchmod(fd, mode)
            if gid is not None:
                os.fchown(fd, -1, gid)
            view = memoryview(data)
            while view:
                view = view[write_fn(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        renamed = True
        if sync_dir:
            os.fsync(dir_fd)
    except OSError as e:
        raise _fail(label, e) from None
    finally:
        if not renamed:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
    return True


def _holds(
    dir_fd: int, name: str, st: os.stat_result, data: bytes, mode: int, gid: int | None
) -> bool:
    """Whether the regular file *name* (stat *st*) already is exactly what we would write."""
    if st.st_size != len(data) or stat.S_IMODE(st.st_mode) != mode:
        return False
    if gid is not None and st.st_gid != gid:
        return False
    try:
        # O_NONBLOCK: a FIFO swapped in since the stat above must not block the open
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        return os.read(fd, len(data) + 1) == data
    except OSError:
        return False
    finally:
        os.close(fd)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal (\040 …)
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_type(path: str, mountinfo: str) -> str | None:
    """The filesystem type at absolute *path* (resolved, existing) per *mountinfo* (the text
    of ``/proc/self/mountinfo``): the mount with the longest mount point above it."""
    where = Path(path)
    best: tuple[int, str] | None = None
    for line in mountinfo.splitlines():
        fields = line.split()
        try:
            mount_point = _unescape(fields[4])
            fstype = fields[fields.index("-", 6) + 1]
        except (IndexError, ValueError):
            continue
        if where.is_relative_to(mount_point) and (best is None or len(mount_point) >= best[0]):
            best = (len(mount_point), fstype)  # later lines are mounted on top: >= wins
    return None if best is None else best[1]


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem holding *path* (or its nearest existing ancestor)."""
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return None
    where = Path(os.path.realpath(path))
    while not where.exists() and where != where.parent:
        where = where.parent
    return mount_type(str(where), mountinfo)


class FileSink:
    """The output directory: one subdirectory per credential, written with :func:`atomic_write`.

    *dir_mode* defaults to 0700 plus whatever lets the readers *file_mode* grants (group,
    others) enter the credential directory.
    """

    def __init__(
        self,
        output_dir: Path,
        *,
        file_mode: int = 0o600,
        file_group: int | None = None,
        dir_mode: int | None = None,
    ) -> None:
        self.output_dir = output_dir
        self.file_mode = file_mode
        self.file_group = file_group
        if dir_mode is None:
            dir_mode = (
                0o700 | (0o050 if file_mode & 0o040 else 0) | (0o005 if file_mode & 0o004 else 0)
            )
        self.dir_mode = dir_mode
        self._swept: dict[str, frozenset[str]] = {}  # credential → file set last cleaned
        self._in_memory: bool | None = None

    def in_memory(self) -> bool:
        """Whether the output directory is on a memory filesystem, where writes do not block
        (looked up once)."""
        if self._in_memory is None:
            self._in_memory = filesystem_type(self.output_dir) in _MEMORY_FS
        return self._in_memory

    @staticmethod
    def _check(name: str) -> None:
        if not NAME_RE.fullmatch(name) or name in (".", ".."):
            raise SinkError(errno.EINVAL, f"invalid credential name {name!r}")

    def _open_root(self, *, create: bool) -> int | None:
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        try:
            try:
                return os.open(self.output_dir, flags)
            except FileNotFoundError:
                if not create:
                    return None
            # Made only when missing: a stat of every parent per write costs more than this.
            make_dirs(self.output_dir, 0o755)
            return os.open(self.output_dir, flags)
        except FileNotFoundError:
            raise SinkError(errno.ENOENT, f"{self.output_dir}: vanished") from None
        except OSError as e:
            raise _fail(str(self.output_dir), e) from None

    def _open_credential(self, root: int, name: str) -> int:
        path = str(self.output_dir / name)
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=root)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise SinkError(
                    errno.ELOOP, f"{path}: not a directory (a symlink?); refusing"
                ) from None
            raise _fail(path, e) from None

    def write(self, name: str, files: Mapping[str, bytes]) -> None:
        """Write every file of credential *name*; remove our files it no longer produces
        and stale temporaries."""
        self._check(name)
        extras = sorted(f for f in files if not _OURS.fullmatch(f))
        for filename in [*extras, *(f for f in files if f == _MANIFEST)]:
            if not _LISTABLE.fullmatch(filename):
                raise SinkError(errno.EINVAL, f"{filename!r}: not an output file name")
        where = os.path.join(self.output_dir, name)
        root = self._open_root(create=True)
        assert root is not None
        # A directory made here (a credential's first write) is empty and only we can write
        # to it: no file of ours to look for, to refuse or to clean up in it.
        fresh = False
        try:
            try:
                os.mkdir(name, self.dir_mode, dir_fd=root)
                fresh = True
            except FileExistsError:
                pass  # an existing symlink too: opening it below refuses it
            except OSError as e:
                raise _fail(where, e) from None
            fd = self._open_credential(root, name)
        finally:
            os.close(root)
        try:
            check_owner(fd, where)  # a directory planted by another user is not adopted
            try:
                os.fchmod(fd, self.dir_mode)
                if self.file_group is not None:
                    os.fchown(fd, -1, self.file_group)
            except OSError as e:
                raise _fail(where, e) from None
            names = frozenset(files)
            changed = self._swept.get(name) != names  # first write, or other outputs
            listed = _listed(fd) if (changed or extras) and not fresh else frozenset()
            manifest = "".join(f"{f}\n" for f in extras).encode()
            if not listed.issuperset(extras):  # listed before they exist, old ones until gone
                union = "".join(f"{f}\n" for f in sorted(listed | set(extras))).encode()
                self._put(fd, _MANIFEST, union, self.file_mode, where, fresh)
            written = False
            for filename, data in files.items():
                # A template's own mode (imsd.templates.ModedBytes) narrows file_mode.
                mode = self.file_mode & getattr(data, "mode", self.file_mode)
                written |= self._put(fd, filename, data, mode, where, fresh)
            if changed and not fresh:
                for entry in os.listdir(fd):
                    stale = (_is_ours(entry) or entry in listed) and entry not in files
                    if stale and entry != _MANIFEST and _unlink_regular(fd, entry):
                        log.info("sink.stale_removed", credential=name, file=entry)
            if changed:
                self._swept[name] = names
            if extras:
                written |= self._put(fd, _MANIFEST, manifest, self.file_mode, where)
            elif listed or (changed and not fresh):
                _unlink_regular(fd, _MANIFEST)
            if written:  # one directory fsync makes every rename above durable
                try:
                    os.fsync(fd)
                except OSError as e:
                    raise _fail(where, e) from None
        finally:
            os.close(fd)

    def _put(
        self, fd: int, filename: str, data: bytes, mode: int, where: str, absent: bool = False
    ) -> bool:
        return atomic_write(
            fd,
            filename,
            data,
            mode=mode,
            gid=self.file_group,
            where=where,
            sync_dir=False,
            skip_unchanged=True,
            absent=absent,
        )

    def remove(self, name: str) -> None:
        """Remove credential *name*'s directory: our files, then the directory if that left it
        empty. A missing directory is fine; a symlinked one is refused (:class:`SinkError`)."""
        self._check(name)
        self._swept.pop(name, None)
        root = self._open_root(create=False)
        if root is None:
            return
        path = str(self.output_dir / name)
        try:
            try:
                fd = self._open_credential(root, name)
            except SinkError as e:
                if e.errno == errno.ENOENT:
                    return
                raise
            try:
                listed = _listed(fd)
                for entry in os.listdir(fd):
                    if _is_ours(entry) or entry in listed:
                        _unlink_regular(fd, entry)
            except OSError as e:
                raise _fail(path, e) from None
            finally:
                os.close(fd)
            try:
                os.rmdir(name, dir_fd=root)
            except OSError as e:
                if e.errno == errno.ENOTEMPTY:
                    log.warning("sink.dir_kept", credential=name, reason="foreign files")
                elif e.errno != errno.ENOENT:
                    raise _fail(path, e) from None
        finally:
            os.close(root)

    def cleanup_orphans(self, keep: set[str]) -> list[str]:
        """At start-up: remove the directories of credentials not in *keep* and stale
        temporaries in those that are. Directories holding anything not ours, symlinks and
        names that are not credential names are left alone. Returns the names removed."""
        root = self._open_root(create=False)
        if root is None:
            return []
        removed: list[str] = []
        try:
            for name in sorted(os.listdir(root)):
                if not NAME_RE.fullmatch(name) or name in (".", ".."):
                    continue
                try:
                    fd = os.open(name, _DIR_FLAGS, dir_fd=root)
                except OSError:
                    continue  # a file, a symlink, or gone: not a credential directory of ours
                try:
                    entries = os.listdir(fd)
                    listed = _listed(fd)
                    # Stale temporaries go from every credential directory, also from one
                    # kept below for its foreign files.
                    for entry in entries:
                        if _TMP.fullmatch(entry):
                            _unlink_regular(fd, entry)
                    if name in keep:
                        continue
                finally:
                    os.close(fd)
                entries = [e for e in entries if not _TMP.fullmatch(e)]
                if not all(_is_ours(e) or e in listed for e in entries):
                    log.warning("sink.orphan_kept", credential=name, reason="foreign files")
                    continue
                self.remove(name)
                removed.append(name)
                log.info("sink.orphan_removed", credential=name)
        except OSError as e:
            if isinstance(e, SinkError):
                raise
            raise _fail(str(self.output_dir), e) from None
        finally:
            os.close(root)
        return removed
