"""State: bytes written to the state directory per refreshed token, at 1,000 and 10,000
credentials, by the SQLite store (only changed rows, WAL, ``synchronous=FULL``) against the
``tokens.json`` rewrite it replaced (the whole file on every save), both measured in the same
run on the same synthetic entries. No daemon: ``StateFile`` is driven directly, as the
supervisor does (at most one save a second, carrying the refreshes since the last one).

Two loads: one refresh per save (steady state: 10,000 credentials with 24 h tokens refresh
about once every 7 s fleet-wide) and 3 % of the credentials per save (a burst). Bytes are the
process's ``wchar`` (/proc/self/io: every byte passed to write/pwrite, on any filesystem),
including the WAL checkpoint that copies the changed pages into the database (forced at the
end of each window, so its cost is counted once per window instead of by luck). The state dir
is on disk, as ``/var/lib/imsd`` is."""

from __future__ import annotations

import hashlib
import os
import random
import secrets
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

from imsd import logs
from imsd.model import Grant, Secret
from imsd.persist import StateFile, Stored, encode
from imsd.sinks import atomic_write, open_private_dir

from bench.harness import Figure

#: An IMS access token is a JWT of about 1,100 characters.
TOKEN_CHARS = 1100


def _wchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/self/io")


def _stored(i: int, now: float) -> Stored:
    token = "eyJ" + secrets.token_urlsafe(TOKEN_CHARS * 3 // 4)[: TOKEN_CHARS - 3]
    identity = hashlib.sha256(f"credential-{i}".encode()).hexdigest()
    return Stored(identity, Grant(Secret(token), "bearer", now, now + 86400.0))


def _window(
    state_dir: Path, entries: dict[str, Stored], per_save: int, saves: int, rng: random.Random
) -> tuple[float, float, float, float]:
    """(SQLite bytes, JSON bytes, SQLite seconds, JSON seconds) per refresh."""
    names = sorted(entries)
    index = {name: i for i, name in enumerate(names)}
    state = StateFile(state_dir / "sqlite")
    state.load()
    state.save(entries)
    db = sqlite3.connect(state.path)  # the bench's own: only to force the checkpoint
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    now = time.time()
    w0, t0 = _wchar(), time.perf_counter()
    for _ in range(saves):
        for name in rng.sample(names, per_save):
            entries[name] = _stored(index[name], now)
        state.save(entries)
    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
    sqlite_bytes, sqlite_s = _wchar() - w0, time.perf_counter() - t0
    db.close()
    state.close()
    # The replaced store: encode() written atomically (temporary, fsync, rename) per save.
    json_saves = max(1, min(saves, 5))  # every save writes the same amount: a few suffice
    fd = open_private_dir(state_dir / "json", 0o700)
    try:
        w0, t0 = _wchar(), time.perf_counter()
        for _ in range(json_saves):
            atomic_write(fd, "tokens.json", encode(entries), mode=0o600)
        json_bytes, json_s = _wchar() - w0, time.perf_counter() - t0
    finally:
        os.close(fd)
    refreshes = saves * per_save
    return (
        sqlite_bytes / refreshes,
        json_bytes / json_saves / per_save,
        sqlite_s / refreshes,
        json_s / json_saves / per_save,
    )


def run(quick: bool) -> list[Figure]:
    logs.configure("warning")  # no state.loaded line per window in the table's output
    sizes = (1000,) if quick else (1000, 10_000)
    saves = 20 if quick else 60
    rng = random.Random(11)
    figures: list[Figure] = []
    for n in sizes:
        now = time.time()
        entries = {f"c{i:05d}": _stored(i, now) for i in range(n)}
        for per_save in (1, n * 3 // 100):
            root = Path(tempfile.mkdtemp(prefix="imsd-bench-state-"))
            try:
                sq, js, sq_t, js_t = _window(root, entries, per_save, saves, rng)
            finally:
                shutil.rmtree(root)
            load = "1 refresh per save" if per_save == 1 else f"{per_save} refreshes per save"
            figures += [
                Figure("state", f"{n:,} credentials, {load}: bytes per refresh", sq / 1024,
                       "KiB", js / 1024, "tokens.json rewrite"),
                Figure("state", f"{n:,} credentials, {load}: save time per refresh",
                       sq_t * 1000, "ms", js_t * 1000, "tokens.json rewrite"),
            ]  # fmt: skip
    return figures
