"""The directory watcher on real directories: every way a credential file changes."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import itertools
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
from imsd import inotify, watcher
from imsd.catalog import Added, Changed, Event, Failed, Removed
from imsd.credentials import parse_credentials
from imsd.model import CredentialError
from imsd.watcher import DirectoryWatcher, ScanCache, dir_trust_problem, scan_directory
from structlog.testing import capture_logs

from tests.support import wait_for

pytestmark = pytest.mark.anyio

ORG = "0123456789ABCDEF01234567@AdobeOrg"


def body(client: str = "cid", secret_file: str | None = None) -> str:
    secret = f'client_secret_file = "{secret_file}"' if secret_file else 'client_secret = "s3"'
    return f'client_id = "{client}"\n{secret}\norg_id = "{ORG}"\nscopes = ["openid"]\n'


def parse(path: Path, data: bytes) -> Sequence[Any]:
    return parse_credentials(path, data, env={})


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    async def __call__(self, events: list[Event]) -> None:
        self.events.extend(events)

    async def wait(self, predicate: Callable[[Event], bool], limit: float = 10.0) -> Event:
        with anyio.fail_after(limit):
            while True:
                for e in self.events:
                    if predicate(e):
                        self.events.remove(e)
                        return e
                await anyio.sleep(0.02)


@pytest.fixture(params=["inotify", "watchfiles"])
async def watch(
    tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[[Path], Any]]:
    """A running watcher whose periodic re-scan is far off: what it sees came as events,
    through each backend (watchfiles stands in where inotify is missing)."""
    async with anyio.create_task_group() as tg:

        async def start(root: Path) -> Recorder:
            rec = Recorder()
            w = DirectoryWatcher(
                root,
                parse=parse,
                on_events=rec,
                debounce_ms=20,
                rescan_interval=30.0,
                use_inotify=request.param == "inotify",
            )
            await tg.start(w.run)
            return rec

        yield start
        tg.cancel_scope.cancel()


def named(kind: type, name: str) -> Callable[[Event], bool]:
    def check(e: Event) -> bool:
        if not isinstance(e, kind):
            return False
        if isinstance(e, Added | Removed):
            return e.cred.name == name
        if isinstance(e, Changed):
            return e.new.name == name
        if isinstance(e, Failed):
            return (e.name or e.path.stem) == name
        return False

    return check


async def test_add_change_remove_and_rename_save(tmp_path: Path, watch: Any) -> None:
    (tmp_path / "a.toml").write_text(body())
    rec = await watch(tmp_path)
    await rec.wait(named(Added, "a"))  # the initial scan is delivered before start returns
    (tmp_path / "b.toml").write_text(body())
    await rec.wait(named(Added, "b"))
    tmp = tmp_path / ".a.toml.swp"
    tmp.write_text(body(client="other"))
    os.replace(tmp, tmp_path / "a.toml")  # an editor's rename-save
    changed = await rec.wait(named(Changed, "a"))
    assert isinstance(changed, Changed)
    assert changed.new.client_id == "other"
    (tmp_path / "b.toml").unlink()
    await rec.wait(named(Removed, "b"))
    (tmp_path / "b.toml").write_text(body())  # deleted and re-created
    await rec.wait(named(Added, "b"))


async def test_invalid_file_beside_valid(tmp_path: Path, watch: Any) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "good.toml").write_text(body())
    rec = await watch(tmp_path)
    await rec.wait(named(Added, "good"))
    failed = await rec.wait(named(Failed, "bad"))
    assert isinstance(failed, Failed)
    assert "bad.json" in str(failed.error)


async def test_kubernetes_secret_volume_swap(tmp_path: Path, watch: Any) -> None:
    def publish(version: str, client: str) -> None:
        data = tmp_path / f"..{version}"
        data.mkdir()
        (data / "svc.toml").write_text(body(client=client))
        link = tmp_path / "..data_tmp"
        link.symlink_to(data.name)
        os.replace(link, tmp_path / "..data")
        if not (tmp_path / "svc.toml").is_symlink():
            (tmp_path / "svc.toml").symlink_to("..data/svc.toml")

    publish("2026_11_25_01", "v1")
    rec = await watch(tmp_path)
    await rec.wait(named(Added, "svc"))
    publish("2026_11_25_02", "v2")
    shutil.rmtree(tmp_path / "..2026_11_25_01")
    changed = await rec.wait(named(Changed, "svc"))
    assert isinstance(changed, Changed)
    assert changed.new.client_id == "v2"


async def test_secret_file_change_is_a_change(tmp_path: Path, watch: Any) -> None:
    (tmp_path / "a.secret").write_text("one")
    (tmp_path / "a.toml").write_text(body(secret_file="a.secret"))
    rec = await watch(tmp_path)
    await rec.wait(named(Added, "a"))
    (tmp_path / "a.secret").write_text("two")
    changed = await rec.wait(named(Changed, "a"))
    assert isinstance(changed, Changed)
    assert changed.new.client_secret.reveal() == "two"


async def test_directory_replaced(tmp_path: Path, watch: Any) -> None:
    root = tmp_path / "creds"
    root.mkdir()
    (root / "a.toml").write_text(body())
    rec = await watch(root)
    await rec.wait(named(Added, "a"))
    root.rename(tmp_path / "old")
    fresh = tmp_path / "new"
    fresh.mkdir()
    (fresh / "z.toml").write_text(body())
    fresh.rename(root)
    await rec.wait(named(Added, "z"))
    await rec.wait(named(Removed, "a"))


def test_scan_ignores_dotfiles_links_and_other_extensions(tmp_path: Path) -> None:
    (tmp_path / ".hidden.toml").write_text(body())
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "dir.toml").mkdir()
    (tmp_path / "a.toml").write_text(body())
    (tmp_path / "dangling.toml").symlink_to("nowhere")
    scan = scan_directory(tmp_path, parse=functools.partial(parse))
    assert scan is not None
    assert sorted(p.name for p in scan) == ["a.toml"]
    assert scan_directory(tmp_path / "missing", parse=parse) is None


class CountingParse:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, path: Path, data: bytes) -> Sequence[Any]:
        self.calls.append(path.name)
        return parse(path, data)

    def take(self) -> list[str]:
        calls, self.calls = sorted(self.calls), []
        return calls


def test_rescan_reparses_only_what_changed(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(watcher, "RACY", -1.0)  # every file counts as settled
    (tmp_path / "b.secret").write_text("first")
    (tmp_path / "a.toml").write_text(body("a"))
    (tmp_path / "b.toml").write_text(body("b", secret_file="b.secret"))
    (tmp_path / "c.toml").write_text("not toml [")
    counting, cache = CountingParse(), ScanCache()

    def scan() -> dict[str, Any]:
        result = scan_directory(tmp_path, parse=counting, cache=cache)
        assert result is not None
        return {p.name: r for p, r in result.items()}

    first = scan()
    assert counting.take() == ["a.toml", "b.toml", "c.toml"]
    second = scan()
    assert second["a.toml"] is first["a.toml"]
    assert second["b.toml"] is first["b.toml"]
    assert str(second["c.toml"]) == str(first["c.toml"])
    assert counting.take() == ["c.toml"]  # errors are never cached
    (tmp_path / "a.toml").write_text(body("a2"))
    assert scan()["a.toml"][0].client_id == "a2"
    assert counting.take() == ["a.toml", "c.toml"]
    (tmp_path / "b.secret").write_text("second, in place")  # same inode, the toml unchanged
    assert scan()["b.toml"][0].client_secret.reveal() == "second, in place"
    assert counting.take() == ["b.toml", "c.toml"]
    (tmp_path / "b.secret").unlink()
    assert "file not found" in str(scan()["b.toml"])
    (tmp_path / "a.toml").unlink()
    assert "a.toml" not in scan()
    assert "a.toml" not in {p.name for p in cache}


def test_racy_entries_are_checked_by_content(tmp_path: Path, monkeypatch: Any) -> None:
    # Every file counts as just written: a second write within one tick of the filesystem
    # clock could leave the same stat, so the parse is trusted only if the bytes hash alike.
    monkeypatch.setattr(watcher, "RACY", 3600.0)
    path = tmp_path / "a.toml"
    path.write_text(body("a1"))
    counting, cache = CountingParse(), ScanCache()
    for _ in range(3):
        scan_directory(tmp_path, parse=counting, cache=cache)
    assert counting.take() == ["a.toml"]  # same bytes: reused
    assert not cache[path].settled
    # The same size rewritten, and its stat made to look unchanged (as one clock tick can):
    path.write_text(body("a2"))
    cache[path] = dataclasses.replace(cache[path], key=watcher._key(os.stat(path)))
    result = scan_directory(tmp_path, parse=counting, cache=cache)
    assert result is not None
    assert result[path][0].client_id == "a2"  # type: ignore[index]
    assert counting.take() == ["a.toml"]


def test_a_racy_secret_file_is_checked_by_value(tmp_path: Path, monkeypatch: Any) -> None:
    # Its stat is taken after the parse read it: only the value the parse used, compared
    # with what the file holds now, proves nothing changed in between.
    monkeypatch.setattr(watcher, "RACY", 3600.0)
    secret, path = tmp_path / "b.secret", tmp_path / "b.toml"
    secret.write_text("first")
    path.write_text(body("b", secret_file="b.secret"))
    counting, cache = CountingParse(), ScanCache()
    for _ in range(2):
        scan_directory(tmp_path, parse=counting, cache=cache)
    assert counting.take() == ["b.toml"]
    secret.write_text("other")  # same size; its stat made to look unchanged below
    entry = cache[path]
    stale = tuple((s, watcher._key(os.stat(s)), d) for s, _, d in entry.sources)
    cache[path] = dataclasses.replace(entry, sources=stale)
    result = scan_directory(tmp_path, parse=counting, cache=cache)
    assert result is not None
    assert result[path][0].client_secret.reveal() == "other"  # type: ignore[index]
    assert counting.take() == ["b.toml"]


async def test_a_full_scan_rereads_everything(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(watcher, "RACY", -1.0)
    (tmp_path / "a.toml").write_text(body("a"))
    counting = CountingParse()
    w = DirectoryWatcher(tmp_path, parse=counting, on_events=Recorder())
    w.scan()
    w.scan()
    assert counting.take() == ["a.toml"]
    await w.rescan(full=True)
    assert counting.take() == ["a.toml"]


async def test_racy_files_are_checked_again_once_their_stats_can_be_trusted(
    tmp_path: Path, monkeypatch: Any
) -> None:
    # No event and a rescan_interval of an hour: only the follow-up scan that a racy result
    # asks for can settle the entry (and catch a write one clock tick hid).
    monkeypatch.setattr(watcher, "RACY", 0.3)
    (tmp_path / "a.toml").write_text(body("a"))
    w = DirectoryWatcher(tmp_path, parse=parse, on_events=Recorder(), rescan_interval=3600.0)
    async with anyio.create_task_group() as tg:
        await tg.start(w.run)
        assert [p.settled for p in w._cache.values()] == [False]
        await wait_for(lambda: all(p.settled for p in w._cache.values()))
        assert not w._racy
        tg.cancel_scope.cancel()


# -- files that would block a scan -------------------------------------------------------------


def _unblock(fifo: Path) -> None:
    """Give a reader stuck on *fifo* its end of file (old code), so no thread is left hanging."""
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def test_a_fifo_secret_file_is_an_error_not_a_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.secret"
    os.mkfifo(fifo)
    (tmp_path / "piped.toml").write_text(body("p", secret_file="pipe.secret"))
    (tmp_path / "good.toml").write_text(body("g"))
    done: list[Any] = []
    # A daemon thread with a generous join: a hang guard, not a timing assertion.
    t = threading.Thread(target=lambda: done.append(scan_directory(tmp_path, parse=parse)))
    t.daemon = True
    t.start()
    t.join(60)
    if t.is_alive():
        _unblock(fifo)
        pytest.fail("the scan blocked on a FIFO")
    [scan] = done
    assert scan[tmp_path / "good.toml"][0].client_id == "g"
    error = scan[tmp_path / "piped.toml"]
    assert isinstance(error, CredentialError)
    assert error.field == "client_secret_file"
    assert f"cannot read {fifo}: not a regular file (a FIFO)" in str(error)


def test_check_does_not_hang_on_a_fifo(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    fifo = creds / "pipe.secret"
    os.mkfifo(fifo)
    (creds / "piped.toml").write_text(body("p", secret_file="pipe.secret"))
    (creds / "good.toml").write_text(body("g"))
    try:
        r = subprocess.run(
            [sys.executable, "-m", "imsd", "check", "--credentials-dir", str(creds)],
            capture_output=True,
            text=True,
            timeout=60,  # a hang guard
            env={k: v for k, v in os.environ.items() if not k.startswith("IMSD_")},
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("imsd check hung on a FIFO")
    assert r.returncode == 1
    assert f"client_secret_file: cannot read {fifo}: not a regular file (a FIFO)" in r.stderr
    assert "good.toml" not in r.stdout + r.stderr


# -- who else can write the directory ----------------------------------------------------------


def test_a_directory_others_can_write_is_warned_about_once(tmp_path: Path) -> None:
    open_dir, private = tmp_path / "open", tmp_path / "private"
    open_dir.mkdir()
    private.mkdir(mode=0o750)
    open_dir.chmod(0o1777)  # the sticky bit stops no one from adding a file
    (open_dir / "a.toml").write_text(body())
    with capture_logs() as logs:
        for _ in range(2):
            assert scan_directory(open_dir, parse=parse) is not None
            assert scan_directory(private, parse=parse) is not None
    [warning] = [e for e in logs if e["event"] == "credentials.dir_not_private"]
    assert warning["root"] == str(open_dir)
    assert warning["problem"] == "writable by group and others (mode 1777)"
    assert warning["log_level"] == "warning"


def test_dir_trust_rules() -> None:
    def st(uid: int, mode: int) -> os.stat_result:
        return os.stat_result((0o040000 | mode, 0, 0, 1, uid, 0, 0, 0, 0, 0))

    assert dir_trust_problem(st(0, 0o755), uid=1000, read_only=False) is None
    assert dir_trust_problem(st(1000, 0o700), uid=1000, read_only=False) is None
    assert dir_trust_problem(st(1001, 0o700), uid=1000, read_only=False) == "owned by uid 1001"
    assert dir_trust_problem(st(1001, 0o700), uid=0, read_only=False) == "owned by uid 1001"
    assert dir_trust_problem(st(0, 0o770), uid=0, read_only=False) == (
        "writable by group (mode 0770)"
    )
    assert dir_trust_problem(st(0, 0o757), uid=0, read_only=False) == (
        "writable by others (mode 0757)"
    )
    # A read-only mount (a Kubernetes Secret volume) cannot be written whatever its mode.
    assert dir_trust_problem(st(0, 0o1777), uid=1000, read_only=True) is None


async def test_a_stuck_scan_does_not_hold_up_cancellation(tmp_path: Path) -> None:
    # A read stuck in the kernel (a hung NFS mount) must not keep the daemon from stopping.
    (tmp_path / "a.toml").write_text(body())
    entered, release = threading.Event(), threading.Event()

    def stuck(path: Path, data: bytes) -> Sequence[Any]:
        entered.set()
        release.wait()
        return parse(path, data)

    w = DirectoryWatcher(tmp_path, parse=stuck, on_events=Recorder())
    guard = threading.Timer(60, release.set)  # old code waits for the thread: unstick it
    guard.start()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(w.rescan)
            await anyio.to_thread.run_sync(entered.wait)
            tg.cancel_scope.cancel()
        assert not release.is_set()  # cancelled while the scan was still stuck
    finally:
        release.set()
        guard.cancel()


async def test_no_watch_to_be_had_means_rescans_with_backoff_and_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """inotify's per-user limits reached (EMFILE): changes are still found by re-scans,
    spaced out rather than a busy loop, and the failure is logged once, not per retry."""
    attempts: list[float] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(time.monotonic())
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(inotify, "DirectoryChanges", refuse)
    monkeypatch.setattr(inotify, "available", lambda: True)
    rec = Recorder()
    w = DirectoryWatcher(tmp_path, parse=parse, on_events=rec, rescan_interval=3600.0)
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            await tg.start(w.run)
            (tmp_path / "late.toml").write_text(body())
            await rec.wait(named(Added, "late"), limit=10)
            await anyio.sleep(2.0)  # a few more retries
            tg.cancel_scope.cancel()
    lost = [e for e in logs if e["event"] == "watcher.watch_lost"]
    assert len(lost) == 1
    assert "Too many open files" in lost[0]["error"]
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert len(attempts) >= 3
    assert gaps[-1] > 2 * gaps[0]
