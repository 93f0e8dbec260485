"""Atomic token files on a real filesystem."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from imsd import sinks
from imsd.sinks import FileSink, SinkError


@pytest.fixture
def umask_zero() -> Iterator[None]:
    old = os.umask(0)
    yield
    os.umask(old)


def test_write_creates_files_with_exact_mode(tmp_path: Path, umask_zero: None) -> None:
    sink = FileSink(tmp_path / "out", file_mode=0o640)
    sink.write("alpha", {"token": b"abc", "token.json": b"{}\n"})
    d = tmp_path / "out" / "alpha"
    assert (d / "token").read_bytes() == b"abc"
    assert {p.name: p.stat().st_mode & 0o777 for p in d.iterdir()} == {
        "token": 0o640,
        "token.json": 0o640,
    }
    assert d.stat().st_mode & 0o777 == 0o750  # group readers of the files can enter


def test_rewrite_removes_outputs_no_longer_produced(tmp_path: Path) -> None:
    sink = FileSink(tmp_path)
    sink.write("a", {"token": b"1", "aep.headers": b"x", "aep.env": b"y"})
    (tmp_path / "a" / "notes.txt").write_text("not ours")
    sink.write("a", {"token": b"2"})
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["notes.txt", "token"]


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


def test_symlinked_credential_dir_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a").symlink_to(elsewhere)
    with pytest.raises(SinkError, match="symlink"):
        FileSink(tmp_path / "out").write("a", {"token": b"1"})
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("name", ["..", ".", "a/b", "", "x" * 65])
def test_hostile_names_rejected(tmp_path: Path, name: str) -> None:
    with pytest.raises(SinkError, match="invalid credential name"):
        FileSink(tmp_path).write(name, {"token": b"1"})


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
    assert "new-token" not in str(err.value)
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["token"]
    assert (tmp_path / "a" / "token").read_bytes() == b"old-token"
    monkeypatch.undo()
    sink.write("a", {"token": b"new-token"})  # writes resume when space returns
    assert (tmp_path / "a" / "token").read_bytes() == b"new-token"


def test_remove_and_orphan_cleanup(tmp_path: Path) -> None:
    sink = FileSink(tmp_path)
    for name in ("a", "b", "c"):
        sink.write(name, {"token": b"t", "generic.env": b"e"})
    (tmp_path / "c" / "mine.txt").write_text("foreign file: keep the directory")
    sink.remove("a")
    assert not (tmp_path / "a").exists()
    sink.remove("a")  # idempotent
    assert sink.cleanup_orphans(keep={"x"}) == ["b"]
    assert (tmp_path / "c" / "mine.txt").exists()


def test_reader_never_sees_a_partial_or_empty_file(tmp_path: Path) -> None:
    """1,000 rewrites of varying length while a reader polls the file."""
    sink = FileSink(tmp_path)
    values = [(f"token-{i}-" + "x" * (i * 37 % 4000)).encode() for i in range(1000)]
    written = set(values)
    sink.write("a", {"token": values[0]})
    path = tmp_path / "a" / "token"
    done = threading.Event()
    bad: list[bytes] = []
    reads = 0

    def reader() -> None:
        nonlocal reads
        while not done.is_set():
            data = path.read_bytes()
            reads += 1
            if data not in written:
                bad.append(data)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for value in values:
            sink.write("a", {"token": value})
    finally:
        done.set()
        t.join()
    assert bad == []
    assert reads > 0
    assert path.read_bytes() == values[-1]
