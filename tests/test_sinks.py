"""Atomic token files on a real filesystem."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from imsd import sinks
from imsd.sinks import FileSink, SinkError, atomic_write, filesystem_type, mount_type


@pytest.fixture
def umask_zero() -> Iterator[None]:
    old = os.umask(0)
    yield
    os.umask(old)


@pytest.fixture
def dir_fd(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def mode(path: Path) -> int:
    return path.lstat().st_mode & 0o777


# -- atomic_write ----------------------------------------------------------------------------


@pytest.mark.parametrize(("umask", "file_mode"), [(0, 0o600), (0o077, 0o640), (0o777, 0o600)])
def test_atomic_write_mode_ignores_umask(
    tmp_path: Path, dir_fd: int, umask: int, file_mode: int
) -> None:
    old = os.umask(umask)
    try:
        atomic_write(dir_fd, "f", b"one", mode=file_mode)
        assert mode(tmp_path / "f") == file_mode
        atomic_write(dir_fd, "f", b"two", mode=file_mode)  # replacing keeps it exact too
    finally:
        os.umask(old)
    assert mode(tmp_path / "f") == file_mode
    assert (tmp_path / "f").read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["f"]


def test_atomic_write_sets_group(tmp_path: Path, dir_fd: int) -> None:
    # Root may hand the file to any group; others to a supplementary group of theirs.
    others = [g for g in os.getgroups() if g != os.getegid()]
    gid = 4242 if os.geteuid() == 0 else others[0] if others else os.getegid()
    atomic_write(dir_fd, "f", b"x", mode=0o640, gid=gid)
    assert (tmp_path / "f").stat().st_gid == gid


def test_atomic_write_refuses_symlink_target(tmp_path: Path, dir_fd: int) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "f").symlink_to(victim)
    with pytest.raises(SinkError, match=r"^\[Errno \d+\] f: exists and is not a regular file"):
        atomic_write(dir_fd, "f", b"new", where="")
    assert victim.read_text() == "precious"
    assert (tmp_path / "f").is_symlink()
    assert sorted(os.listdir(tmp_path)) == ["f", "victim"]


def test_atomic_write_refuses_directory_target(tmp_path: Path, dir_fd: int) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(SinkError, match="not a regular file"):
        atomic_write(dir_fd, "d", b"new")


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "a\0b"])
def test_atomic_write_rejects_bad_names(dir_fd: int, name: str) -> None:
    with pytest.raises(SinkError, match="invalid file name"):
        atomic_write(dir_fd, name, b"x")


def test_atomic_write_partial_write_then_enospc(
    tmp_path: Path, dir_fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    atomic_write(dir_fd, "token", b"old-token")
    calls = 0

    def fills_up(fd: int, data: bytes | memoryview) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            return os.write(fd, bytes(data[:3]))  # a short write first: the loop continues
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sinks, "write_fn", fills_up)
    with pytest.raises(SinkError) as err:
        atomic_write(dir_fd, "token", b"brand-new-token", where=str(tmp_path))
    assert calls == 2
    assert err.value.errno == errno.ENOSPC
    assert str(err.value) == f"[Errno {errno.ENOSPC}] {tmp_path}/token: No space left on device"
    assert "brand-new" not in str(err.value)
    assert os.listdir(tmp_path) == ["token"]
    assert (tmp_path / "token").read_bytes() == b"old-token"


def test_atomic_write_cleans_up_on_any_exception(
    tmp_path: Path, dir_fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(fd: int, data: bytes | memoryview) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(sinks, "write_fn", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(dir_fd, "token", b"x")
    assert os.listdir(tmp_path) == []


# -- FileSink --------------------------------------------------------------------------------


def test_write_creates_files_with_exact_mode(tmp_path: Path, umask_zero: None) -> None:
    sink = FileSink(tmp_path / "out", file_mode=0o640)
    sink.write("alpha", {"token": b"abc", "token.json": b"{}\n"})
    d = tmp_path / "out" / "alpha"
    assert (d / "token").read_bytes() == b"abc"
    assert {p.name: mode(p) for p in d.iterdir()} == {"token": 0o640, "token.json": 0o640}
    assert mode(d) == 0o750  # group readers of the files can enter


@pytest.mark.parametrize(
    ("file_mode", "dir_mode", "expected"),
    [(0o600, None, 0o700), (0o644, None, 0o755), (0o600, 0o711, 0o711)],
)
def test_directory_mode(
    tmp_path: Path, file_mode: int, dir_mode: int | None, expected: int
) -> None:
    FileSink(tmp_path, file_mode=file_mode, dir_mode=dir_mode).write("a", {"token": b"t"})
    assert mode(tmp_path / "a") == expected
    assert mode(tmp_path / "a" / "token") == file_mode


def test_rewrite_removes_outputs_no_longer_produced(tmp_path: Path) -> None:
    sink = FileSink(tmp_path)
    sink.write("a", {"token": b"1", "aep.headers": b"x", "aep.env": b"y"})
    d = tmp_path / "a"
    (d / "notes.txt").write_text("not ours")
    (d / ".token.tmp-0123456789abcdef").write_text("left by a crash")
    (d / "dir.env").mkdir()  # named like ours but not a regular file: kept
    (d / "link.headers").symlink_to(tmp_path / "elsewhere")
    sink.write("a", {"token": b"2"})
    assert sorted(p.name for p in d.iterdir()) == ["dir.env", "link.headers", "notes.txt", "token"]
    assert (d / "token").read_bytes() == b"2"


def test_symlinked_target_is_refused(tmp_path: Path) -> None:
    sink = FileSink(tmp_path / "out")
    sink.write("a", {"token": b"1"})
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "out" / "a" / "token").unlink()
    (tmp_path / "out" / "a" / "token").symlink_to(victim)
    with pytest.raises(SinkError, match="not a regular file"):
        sink.write("a", {"token": b"2"})
    assert victim.read_text() == "precious"


def test_first_write_into_an_existing_directory_checks_and_cleans_it(tmp_path: Path) -> None:
    # Only a directory the write itself creates is known to be empty: a restart's first
    # write into one a previous run made removes its old outputs and refuses a symlink.
    FileSink(tmp_path).write("a", {"token": b"1", "aep.env": b"y", "run.sh": b"x"})
    d = tmp_path / "a"
    assert (d / ".imsd-templates").read_text() == "run.sh\n"
    FileSink(tmp_path).write("a", {"token": b"2"})
    assert sorted(p.name for p in d.iterdir()) == ["token"]
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (d / "token").unlink()
    (d / "token").symlink_to(victim)
    with pytest.raises(SinkError, match="not a regular file"):
        FileSink(tmp_path).write("a", {"token": b"3"})
    assert victim.read_text() == "precious"


def test_symlinked_credential_dir_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "token").write_text("theirs")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a").symlink_to(elsewhere)
    sink = FileSink(tmp_path / "out")
    with pytest.raises(SinkError, match="symlink"):
        sink.write("a", {"token": b"1"})
    with pytest.raises(SinkError, match="symlink"):
        sink.remove("a")
    assert sink.cleanup_orphans(keep=set()) == []
    assert [p.name for p in elsewhere.iterdir()] == ["token"]
    assert (elsewhere / "token").read_text() == "theirs"
    assert (tmp_path / "out" / "a").is_symlink()


def test_symlinked_output_dir_is_the_operators_choice(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "real")
    FileSink(tmp_path / "out").write("a", {"token": b"1"})
    assert (tmp_path / "real" / "a" / "token").read_bytes() == b"1"


@pytest.mark.parametrize("name", ["..", ".", "a/b", "", "x" * 65, "a\n", "a b"])
def test_hostile_names_rejected(tmp_path: Path, name: str) -> None:
    sink = FileSink(tmp_path / "out")
    with pytest.raises(SinkError, match="invalid credential name"):
        sink.write(name, {"token": b"1"})
    with pytest.raises(SinkError, match="invalid credential name"):
        sink.remove(name)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("filename", ["notes .txt", "../token", ".token", "a/b.env"])
def test_foreign_file_names_rejected(tmp_path: Path, filename: str) -> None:
    with pytest.raises(SinkError, match="not an output file name"):
        FileSink(tmp_path).write("a", {filename: b"1"})


def test_disk_full_leaves_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = FileSink(tmp_path)
    sink.write("a", {"token": b"old-token"})

    def full(fd: int, data: bytes | memoryview) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sinks, "write_fn", full)
    with pytest.raises(SinkError) as err:
        sink.write("a", {"token": b"new-token"})
    assert err.value.errno == errno.ENOSPC
    assert str(tmp_path / "a" / "token") in str(err.value)
    assert "new-token" not in str(err.value)
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["token"]
    assert (tmp_path / "a" / "token").read_bytes() == b"old-token"
    monkeypatch.undo()
    sink.write("a", {"token": b"new-token"})  # writes resume when space returns
    assert (tmp_path / "a" / "token").read_bytes() == b"new-token"


def test_remove(tmp_path: Path) -> None:
    sink = FileSink(tmp_path)
    sink.write("a", {"token": b"t", "token.json": b"{}", "generic.env": b"e"})
    (tmp_path / "a" / ".token.tmp-0123456789abcdef").write_text("stale")
    sink.remove("a")
    assert not (tmp_path / "a").exists()
    sink.remove("a")  # idempotent
    FileSink(tmp_path / "missing").remove("a")  # no output dir yet: nothing to do


def test_remove_keeps_foreign_files_and_their_directory(tmp_path: Path) -> None:
    sink = FileSink(tmp_path)
    sink.write("a", {"token": b"t", "generic.headers": b"h"})
    (tmp_path / "a" / "mine.txt").write_text("someone else's")
    sink.remove("a")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["mine.txt"]


def test_cleanup_orphans(tmp_path: Path) -> None:
    sink = FileSink(tmp_path)
    for name in ("a", "b", "c", "keep"):
        sink.write(name, {"token": b"t", "generic.env": b"e"})
    (tmp_path / "c" / "mine.txt").write_text("foreign file: keep the directory")
    (tmp_path / "keep" / ".token.tmp-0123456789abcdef").write_text("stale")
    (tmp_path / "stray-file").write_text("not a directory")
    (tmp_path / "d").symlink_to(tmp_path / "keep")
    assert sink.cleanup_orphans(keep={"keep", "x"}) == ["a", "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "d", "keep", "stray-file"]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "generic.env",
        "mine.txt",
        "token",
    ]
    assert sorted(p.name for p in (tmp_path / "keep").iterdir()) == ["generic.env", "token"]
    assert FileSink(tmp_path / "missing").cleanup_orphans(keep=set()) == []


STALE = "0123456789abcdef"


def test_start_up_removes_stale_temporaries_of_a_kept_orphan(tmp_path: Path) -> None:
    # A credential gone while its directory holds a foreign file: the directory stays, a
    # temporary a killed write left in it goes.
    sink = FileSink(tmp_path)
    sink.write("gone", {"token": b"t"})
    (tmp_path / "gone" / "mine.txt").write_text("someone else's")
    (tmp_path / "gone" / f".token.tmp-{STALE}").write_text("stale")
    (tmp_path / "gone" / ".token.tmp-notours").write_text("foreign")
    assert sink.cleanup_orphans(keep=set()) == []
    assert sorted(p.name for p in (tmp_path / "gone").iterdir()) == [
        ".token.tmp-notours",
        "mine.txt",
        "token",
    ]


def test_start_up_removes_stale_temporaries_of_the_state_file(tmp_path: Path) -> None:
    from imsd.persist import StateFile, Stored

    state = StateFile(tmp_path)
    state.save({"a": Stored("identity")})
    planted = [f".tokens.json.tmp-{STALE}", f".tokens.json.tmp-{STALE[::-1]}"]
    foreign = [".tokens.json.tmp-0123", f".other.json.tmp-{STALE}", "notes.txt"]
    for name in planted + foreign:
        (tmp_path / name).write_text("x")
    (tmp_path / f".tokens.json.tmp-{'f' * 16}").mkdir()  # not a regular file: left alone
    assert state.load() == {"a": Stored("identity")}  # what start-up calls
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*foreign, f".tokens.json.tmp-{'f' * 16}", "state.db", "state.db-shm", "state.db-wal"]
    )
    assert StateFile(tmp_path / "missing").load() == {}


def test_reader_never_sees_a_partial_or_empty_file(tmp_path: Path) -> None:
    """1,000 rewrites of varying length while a reader polls the file."""
    sink = FileSink(tmp_path)
    values = [(f"token-{i}-" + "x" * (i * 7919 % 20000)).encode() for i in range(1000)]
    written = set(values)
    assert len(written) == len(values)
    sink.write("a", {"token": values[0]})
    path = tmp_path / "a" / "token"
    done = threading.Event()
    bad: list[bytes] = []
    seen: set[bytes] = set()
    reads = 0
    progress = threading.Condition()

    def reader() -> None:
        nonlocal reads
        while not done.is_set():
            data = path.read_bytes()
            if data not in written:
                bad.append(data)
            seen.add(data)
            with progress:
                reads += 1
                progress.notify_all()

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i, value in enumerate(values):
            sink.write("a", {"token": value})
            if i % 50 == 0:  # make sure the reader really interleaves with the writer
                with progress:
                    target = reads + 2
                    while reads < target:
                        assert progress.wait(timeout=10), "reader stalled"
    finally:
        done.set()
        t.join()
    assert bad == []
    # Two reads after each checkpoint write: the second saw exactly that write's value.
    assert {values[i] for i in range(0, 1000, 50)} <= seen
    assert path.read_bytes() == values[-1]
    assert os.listdir(tmp_path / "a") == ["token"]


MOUNTINFO = """\
22 1 0:21 / / rw,relatime - ext4 /dev/sda1 rw
25 22 0:23 / /run rw,nosuid - tmpfs tmpfs rw,mode=755
26 25 0:24 / /run/user/0 rw shared:5 - ramfs none rw
27 22 0:25 / /srv/with\\040space rw - tmpfs tmpfs rw
28 22 0:26 / /srv rw - xfs /dev/sdb rw
29 28 0:27 / /srv rw - tmpfs tmpfs rw
"""


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/", "ext4"),
        ("/var/lib/imsd", "ext4"),
        ("/run", "tmpfs"),
        ("/run/imsd/tokens", "tmpfs"),
        ("/runner/x", "ext4"),  # a prefix of the name is not a parent
        ("/run/user/0/x", "ramfs"),
        ("/srv/with space/tokens", "tmpfs"),
        ("/srv/data", "tmpfs"),  # mounted over /srv's xfs: the later line wins
    ],
)
def test_filesystem_type_from_mountinfo(path: str, expected: str) -> None:
    assert mount_type(path, MOUNTINFO) == expected


def test_filesystem_type_of_real_paths(tmp_path: Path) -> None:
    if Path("/dev/shm").is_dir():
        assert filesystem_type(Path("/dev/shm/not/yet/created")) == "tmpfs"
    assert filesystem_type(tmp_path) is not None
    assert FileSink(Path("/proc/self")).in_memory() is False  # procfs


def test_filesystem_type_unknown_without_mounts() -> None:
    assert mount_type("/x", "garbage line\n") is None


# -- directories: modes whatever the umask, no symlink followed, nothing foreign adopted ------


def test_make_dirs_gives_every_created_directory_its_mode_under_umask_000(
    tmp_path: Path, umask_zero: None
) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    os.chmod(existing, 0o700)
    leaf = existing / "a" / "b" / "c"
    assert sinks.make_dirs(leaf, 0o750) == [existing / "a", existing / "a" / "b", leaf]
    for d in (existing / "a", existing / "a" / "b", leaf):
        assert mode(d) == 0o750  # Path.mkdir(parents=True) made the parents 0777
    assert mode(existing) == 0o700  # not created here: untouched
    assert sinks.make_dirs(leaf, 0o700) == []  # existing ones keep their mode
    assert mode(leaf) == 0o750


def test_output_dir_parents_are_not_world_writable_under_umask_000(
    tmp_path: Path, umask_zero: None
) -> None:
    out = tmp_path / "run" / "imsd" / "tokens"
    FileSink(out).write("c", {"token": b"t"})
    for d in (tmp_path / "run", tmp_path / "run" / "imsd", out):
        assert mode(d) == 0o755
    assert mode(out / "c") == 0o700


def test_a_planted_credential_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root")
    planted = tmp_path / "c"
    planted.mkdir()
    os.chmod(planted, 0o500)
    os.chown(planted, 65534, 65534)
    with pytest.raises(SinkError, match=r"c: owned by uid 65534, not by imsd or root; refusing"):
        FileSink(tmp_path).write("c", {"token": b"secret-token"})
    assert list(planted.iterdir()) == []  # nothing written into it
    st = planted.lstat()
    assert (st.st_mode & 0o777, st.st_uid) == (0o500, 65534)  # not adopted (chmod-ed)
    os.chown(planted, 0, 0)  # root's own (or imsd's) directory is fine
    FileSink(tmp_path).write("c", {"token": b"t"})
    assert mode(planted) == 0o700
