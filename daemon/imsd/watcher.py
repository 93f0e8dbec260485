"""Watching the credentials directory (inotify on Linux, else watchfiles) and turning changes
into catalog events.

Theory of operation
-------------------
The directory is watched, never single files: editors save by renaming over the file, and a
Kubernetes Secret volume updates by swapping its ``..data`` symlink, both of which a watch on
a file would miss. Every batch of changes is only a hint: it triggers a full re-scan, and the
catalog diffs by content digest, so nothing depends on which events the kernel reported. A
periodic re-scan is the safety net for changes no event announces (a secret file outside the
directory, an NFS mount). When the directory itself is replaced (renamed away, deleted and
re-created) its inode changes: the watch is restarted on the new directory. A missing
directory keeps the current credentials (a transient unmount must not remove every token)
and is polled until it returns.

A re-scan re-parses only what changed: a file whose ``stat`` (device, inode, size, mtime,
ctime), and that of every secret file its credentials read, matches the previous scan keeps
its parse. Two writes within one tick of the filesystem clock can leave equal stats, so a
file changed within :data:`RACY` seconds of the scan that parsed it is "racy" (git's word):
the next scan trusts it only if its bytes hash as before and its secret files still hold the
values the parse used (their stats are taken after the parse read them). Errors are never
cached. A periodic re-scan of an unchanged directory thus costs a ``stat`` per file and no
parse; a reload re-reads everything.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import anyio
import anyio.abc
import structlog
from watchfiles import awatch

from imsd import inotify
from imsd.catalog import Catalog, Event, ScanResult
from imsd.credentials import EXTENSIONS, read_secret_file, read_user_file, secret_digest
from imsd.model import Credential, CredentialError

__all__ = [
    "RACY",
    "STEP_MS",
    "DirectoryWatcher",
    "Parse",
    "ScanCache",
    "dir_trust_problem",
    "scan_directory",
]

log = structlog.get_logger("imsd.watcher")

#: watchfiles yields a batch once no new change came for this long: the reaction time to a
#: single edit (a quiet Rust poll loop, so the idle cost stays negligible).
STEP_MS: Final = 20

#: A file changed this recently (seconds) is not trusted to its stat: see the module docstring.
RACY: Final = 2.0

Parse = Callable[[Path, bytes], Sequence[Credential]]
OnEvents = Callable[[list[Event]], Awaitable[None]]
StatKey = tuple[int, int, int, int, int]


@dataclass(frozen=True, slots=True)
class _Parsed:
    key: StatKey
    credentials: list[Credential]
    sources: tuple[tuple[Path, StatKey | None, bytes], ...]  # stat, digest of the value read
    content: bytes  # hash of the file's bytes, for a racy entry
    settled: bool  # every stat was older than RACY when taken: the stats alone can be trusted


#: A previous scan's successful parses, by path; filled and pruned by :func:`scan_directory`.
ScanCache = dict[Path, _Parsed]


def _key(st: os.stat_result) -> StatKey:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class _Memo:
    """Stats and secret values taken once per scan: many credentials often share one secret
    file (10,000 stats of the same file, otherwise). Keyed by the path's string: each parse
    makes its own equal ``Path`` objects, and ``Path.__eq__`` is slow at 10,000."""

    def __init__(self) -> None:
        self._stats: dict[str, StatKey | None] = {}
        self._digests: dict[str, bytes | None] = {}

    def stat(self, path: Path) -> StatKey | None:
        key = os.fspath(path)
        try:
            return self._stats[key]
        except KeyError:
            pass
        try:
            found: StatKey | None = _key(os.stat(key))
        except OSError:
            found = None
        self._stats[key] = found
        return found

    def digest(self, path: Path) -> bytes | None:
        key = os.fspath(path)
        if key not in self._digests:
            try:
                self._digests[key] = secret_digest(read_secret_file(path))
            except (OSError, ValueError):
                self._digests[key] = None
        return self._digests[key]


def _settled(key: StatKey | None, now_ns: int) -> bool:
    return key is not None and now_ns - max(key[3], key[4]) > RACY * 1e9


def _reuse(
    cached: _Parsed | None, key: StatKey, path: Path, now_ns: int, memo: _Memo
) -> _Parsed | None:
    """The cached parse of *path* if nothing it was made from changed, else None."""
    if cached is None or cached.key != key:
        return None
    for source, k, _ in cached.sources:  # plain loops: this runs 10,000 times per re-scan
        if memo.stat(source) != k:
            return None
    if cached.settled:
        return cached
    # Racy: the same stats may hide new content. The file's bytes must hash as parsed, and
    # each secret file must hold the value the parse used (its stat was taken after the read).
    try:
        if hashlib.sha256(read_user_file(path)).digest() != cached.content:
            return None
    except (OSError, ValueError):
        return None
    settled = _settled(key, now_ns)
    for source, k, digest in cached.sources:
        if memo.digest(source) != digest:
            return None
        settled = settled and _settled(k, now_ns)
    return _Parsed(cached.key, cached.credentials, cached.sources, cached.content, settled)


def dir_trust_problem(st: os.stat_result, *, uid: int, read_only: bool) -> str | None:
    """Why a credentials directory with stat *st* is writable by someone other than the
    daemon (running as *uid*) and root, or None. Whoever can add a credential file there
    chooses the commands the daemon runs and where the files it reads are sent."""
    if read_only:  # a read-only mount (a Kubernetes Secret volume), whatever its mode says
        return None
    if st.st_uid not in (0, uid):
        return f"owned by uid {st.st_uid}"
    if st.st_mode & 0o022:
        who = {0o020: "group", 0o002: "others", 0o022: "group and others"}[st.st_mode & 0o022]
        return f"writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


_warned: set[tuple[Path, str]] = set()


def _check_trust(root: Path) -> None:
    """Warn, once per directory and problem, about a credentials directory others can write."""
    try:
        st = os.stat(root)
        read_only = bool(os.statvfs(root).f_flag & os.ST_RDONLY)
    except OSError:
        return
    problem = dir_trust_problem(st, uid=os.geteuid(), read_only=read_only)
    if problem is not None and (root, problem) not in _warned:
        _warned.add((root, problem))
        log.warning(
            "credentials.dir_not_private",
            root=str(root),
            problem=problem,
            why="whoever can write it can make the daemon run commands and send any file "
            "it can read to an IMS URL of their choice",
        )


def _candidate(name: str) -> bool:
    return not name.startswith(".") and name.endswith(EXTENSIONS)


def scan_directory(
    root: Path, *, parse: Parse, cache: ScanCache | None = None
) -> dict[Path, ScanResult] | None:
    """Parse every credential file under *root* (not recursive; symlinks followed).
    None when *root* is not a readable directory. With *cache* (one per *root*), files
    unchanged since the scan that filled it are not read again."""
    try:
        entries = list(os.scandir(root))
    except OSError as e:
        log.error("watcher.root_unavailable", root=str(root), error=e.strerror)
        return None
    _check_trust(root)
    out: dict[Path, ScanResult] = {}
    now_ns = time.time_ns()
    memo = _Memo()
    # The cache's own Path objects: building (and hashing) 10,000 new ones costs more than
    # the stats of an unchanged directory.
    known = {p.name: p for p in cache} if cache is not None else {}
    for entry in entries:
        if not _candidate(entry.name):
            continue
        path = known.get(entry.name) or Path(root, entry.name)
        try:
            if not entry.is_file():  # follows the ..data symlinks of Secret volumes
                continue
            key = _key(entry.stat())
            if cache is not None and (reused := _reuse(cache.get(path), key, path, now_ns, memo)):
                cache[path] = reused
                out[path] = reused.credentials
                continue
            data = read_user_file(path)
        except OSError as e:
            out[path] = CredentialError(path, f"cannot read: {e.strerror or e}")
            continue
        except ValueError as e:  # not a regular file, too large
            out[path] = CredentialError(path, str(e))
            continue
        try:
            parsed = list(parse(path, data))
        except CredentialError as e:
            out[path] = e
            continue
        out[path] = parsed
        if cache is not None:
            sources = tuple((s, memo.stat(s), d) for c in parsed for s, d in c.sources)
            settled = _settled(key, now_ns) and all(_settled(k, now_ns) for _, k, _ in sources)
            digest = hashlib.sha256(data).digest()
            cache[path] = _Parsed(key, parsed, sources, digest, settled)
    if cache is not None:
        for gone in cache.keys() - {p for p, r in out.items() if isinstance(r, list)}:
            del cache[gone]
    return out


def _identity(root: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(root)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class DirectoryWatcher:
    def __init__(
        self,
        root: Path,
        *,
        parse: Parse,
        on_events: OnEvents,
        debounce_ms: int = 200,
        rescan_interval: float = 60.0,
        catalog: Catalog | None = None,
        use_inotify: bool = True,
    ) -> None:
        self.root = root
        self.use_inotify = use_inotify  # else watchfiles (where inotify is missing)
        self.parse = parse
        self.on_events = on_events
        self.debounce_ms = debounce_ms
        self.rescan_interval = rescan_interval
        self.catalog = catalog or Catalog()
        self._lock = anyio.Lock()
        self._cache: ScanCache = {}
        self._racy = False  # the last scan trusted some file by content, not by its stat

    def scan(self, *, full: bool = False) -> dict[Path, ScanResult] | None:
        """Scan the directory (blocking: run it in a worker thread), re-reading only changed
        files unless *full*."""
        # A private copy: a scan abandoned at shutdown (see rescan) may still be running when
        # the next one starts. A cache entry is only trusted while its stats match, so a
        # late swap can cost re-parses but never serve a stale credential.
        cache: ScanCache = {} if full else dict(self._cache)
        result = scan_directory(self.root, parse=self.parse, cache=cache)
        self._cache = cache
        self._racy = any(not p.settled for p in cache.values())
        return result

    async def rescan(
        self, scan: dict[Path, ScanResult] | None = None, *, full: bool = False
    ) -> None:
        """Scan now (or take *scan*, just made by the caller by :meth:`scan`) and deliver the
        resulting events, serialized with other scans. *full* re-reads every file."""
        async with self._lock:
            if scan is None:
                # Abandoned on cancellation: a read stuck in the kernel (a hung NFS mount)
                # must not hold up shutdown.
                scan = await anyio.to_thread.run_sync(
                    lambda: self.scan(full=full), abandon_on_cancel=True
                )
            if scan is None:
                return
            events = self.catalog.apply(scan)
            if events:
                log.debug("watcher.events", count=len(events))
                await self.on_events(events)

    async def run(
        self,
        initial: dict[Path, ScanResult] | None = None,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Deliver the initial state (*initial*, or a fresh scan) before reporting started,
        then follow changes until cancelled."""
        await self.rescan(initial)
        task_status.started()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._periodic)
            await self._watch()

    async def _periodic(self) -> None:
        # Files the last scan found racy are checked again as soon as their stats can be
        # trusted: a write hidden by one clock tick shows then, not a rescan_interval later,
        # and the re-scans after it cost a stat per file instead of a read.
        while True:
            delay = self.rescan_interval
            if self._racy:
                delay = min(delay, RACY + 0.5)
            await anyio.sleep(delay)
            await self.rescan()

    def _changes(self) -> inotify.DirectoryChanges | AsyncGenerator[bool, None]:
        """Batches of changes (True), and False once a second without any (the caller checks
        the directory's identity then); ends if the directory itself goes away."""
        step = min(STEP_MS, self.debounce_ms)
        if self.use_inotify and inotify.available():
            return inotify.DirectoryChanges(
                self.root, debounce_ms=self.debounce_ms, step_ms=step, timeout_ms=1000
            )
        return self._watchfiles(step)

    async def _watchfiles(self, step: int) -> AsyncGenerator[bool, None]:
        async for changes in awatch(
            self.root,
            watch_filter=None,
            debounce=self.debounce_ms,
            step=step,
            rust_timeout=1000,
            yield_on_timeout=True,
            recursive=False,
            ignore_permission_denied=True,
        ):
            yield bool(changes)

    async def _watch(self) -> None:
        first = True
        failures = 0  # watches that could not be set, in a row
        while True:
            ident = _identity(self.root)
            if ident is None:
                await anyio.sleep(1.0)
                if _identity(self.root) is not None:
                    log.info("watcher.root_back", root=str(self.root))
                    await self.rescan()
                continue
            try:
                async with aclosing(self._changes()) as batches:
                    if failures:
                        log.info("watcher.watching", root=str(self.root), after=failures)
                    if not first:  # a new watch: what changed while there was none
                        await self.rescan()
                    first, failures = False, 0
                    async for changes in batches:
                        if changes:
                            await self.rescan()
                        if _identity(self.root) != ident:
                            log.info("watcher.root_replaced", root=str(self.root))
                            await self.rescan()
                            break
            except (OSError, RuntimeError) as e:  # vanished, or no watch to be had
                failures += 1
                if failures == 1:  # once per streak, not every retry
                    log.warning("watcher.watch_lost", root=str(self.root), error=str(e))
                # A watch that cannot be set (inotify's per-user limits) is retried with a
                # re-scan each time, backing off so that it never becomes a busy loop.
                await anyio.sleep(min(5.0, 0.2 * 2 ** min(failures - 1, 5)))
                await self.rescan()
