"""imsd.inotify against a real directory: batches, quiet timeouts, the directory going away,
and reads that must not count as changes."""

from __future__ import annotations

import os
from contextlib import aclosing
from pathlib import Path

import anyio
import pytest
from imsd import inotify

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not inotify.available(), reason="inotify is Linux's"),
]


def batches(root: Path, timeout_ms: int = 100) -> inotify.DirectoryChanges:
    return inotify.DirectoryChanges(root, debounce_ms=200, step_ms=20, timeout_ms=timeout_ms)


async def test_a_burst_of_writes_is_one_batch_and_quiet_is_false(tmp_path: Path) -> None:
    async with aclosing(batches(tmp_path)) as it:
        assert await anext(it) is False  # nothing yet: the timeout's answer
        for i in range(5):
            (tmp_path / f"f{i}.toml").write_text("x")
        with anyio.fail_after(5):
            assert await anext(it) is True
            assert await anext(it) is False  # the burst was one batch


async def test_reads_opens_and_listings_are_not_changes(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text("x")
    async with aclosing(batches(tmp_path)) as it:
        (tmp_path / "a.toml").read_text()
        os.listdir(tmp_path)
        os.stat(tmp_path / "a.toml")
        assert await anext(it) is False


@pytest.mark.parametrize("change", ["rename", "chmod", "remove", "symlink swap"])
async def test_each_kind_of_change_is_seen(tmp_path: Path, change: str) -> None:
    (tmp_path / "a.toml").write_text("x")
    (tmp_path / "..v1").mkdir()
    async with aclosing(batches(tmp_path, timeout_ms=5000)) as it:
        if change == "rename":
            (tmp_path / ".a.swp").write_text("y")
            os.replace(tmp_path / ".a.swp", tmp_path / "a.toml")
        elif change == "chmod":
            (tmp_path / "a.toml").chmod(0o600)
        elif change == "remove":
            (tmp_path / "a.toml").unlink()
        else:
            (tmp_path / "..data_tmp").symlink_to("..v1")
            os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
        with anyio.fail_after(5):
            assert await anext(it) is True


@pytest.mark.parametrize("how", ["moved", "deleted"])
async def test_it_ends_when_the_directory_goes(tmp_path: Path, how: str) -> None:
    root = tmp_path / "creds"
    root.mkdir()
    fds = len(os.listdir("/proc/self/fd"))
    async with aclosing(batches(root, timeout_ms=5000)) as it:
        if how == "moved":
            root.rename(tmp_path / "elsewhere")
        else:
            root.rmdir()
        with anyio.fail_after(5):
            assert await anext(it) is True  # look again
            with pytest.raises(StopAsyncIteration):
                await anext(it)
    assert len(os.listdir("/proc/self/fd")) == fds  # the watch's descriptor is closed


def test_a_missing_directory_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="missing"):
        batches(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="file"):  # IN_ONLYDIR
        batches(tmp_path / "file")
