"""Tokens survive a restart: the state database, the legacy tokens.json it imports, and both
through the daemon."""

from __future__ import annotations

import functools
import io
import json
import math
import os
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from imsd import logs
from imsd.daemon import Daemon, run_once
from imsd.fakeims.server import FakeIms
from imsd.model import Grant, Secret
from imsd.persist import StateError, StateFile, Stored, decode, diff, encode
from imsd.registry import load_registry
from imsd.sinks import SinkError

from tests.support import SECRET2, make_settings, write_cred

ORG = "0123456789ABCDEF01234567@AdobeOrg"
TOKEN = "tok-Secret0123456789"  # must never appear in a log line


def mode(path: Path) -> int:
    return path.lstat().st_mode & 0o777


def grant(token: str = TOKEN, issued: float = 100.0, expires: float = 200.0) -> Grant:
    return Grant(Secret(token), "bearer", issued, expires)


def entry(i: int, token: str = TOKEN, rt: str | None = None) -> Stored:
    return Stored(f"id-{i}", grant(f"{token}-{i}"), Secret(rt) if rt else None)


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    logs.configure("info", "json", stream)
    try:
        yield stream
    finally:
        logs.configure("warning", "json")


def sql(path: Path, *statements: str) -> list[tuple[object, ...]]:
    """Run statements on the database as the ``sqlite3`` command line would; the last
    one's rows."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        rows: list[tuple[object, ...]] = []
        for st in statements:
            rows = conn.execute(st).fetchall()
        return rows
    finally:
        conn.close()


# -- the legacy tokens.json (imported once, then removed) ---------------------------------


def test_legacy_round_trip_and_rejections() -> None:
    g = Grant(Secret("tok"), "bearer", 100.0, 200.0)
    entries = {"a": Stored("id-a", g, Secret("rt")), "b": Stored("id-b")}
    assert decode(encode(entries)) == entries
    for bad in (
        b"nope",
        b"[]",
        b'{"kind": "other"}',
        b'{"kind": "imsd-state", "version": 99, "credentials": {}}',
    ):
        with pytest.raises(StateError):
            decode(bad)
    doc = json.loads(encode(entries))
    doc["credentials"]["a"]["grant"]["expires_at"] = "soon"
    assert set(decode(json.dumps(doc).encode())) == {"b"}  # the bad entry alone is dropped


BAD_TOKENS = [("a\\b", "bearer"), ('"ab', "bearer"), ("a b", "bearer"), ("ab", "mac")]


@pytest.mark.parametrize(("token", "token_type"), BAD_TOKENS)
def test_a_legacy_token_imsd_would_refuse_from_ims_is_dropped(token: str, token_type: str) -> None:
    """The state is held to what an IMS answer is: a token no header or env file can
    carry as is (written by an older imsd, or planted) is never restored and published."""
    good = Grant(Secret("tok"), "bearer", 100.0, 200.0)
    bad = Grant(Secret(token), token_type, 100.0, 200.0)
    data = encode({"a": Stored("id-a", bad), "b": Stored("id-b", good)})
    assert set(decode(data)) == {"b"}


@pytest.mark.parametrize(
    ("literal", "whole_file"),
    [("NaN", True), ("Infinity", True), ("-Infinity", True), ("1e400", False), ("9" * 400, False)],
)
def test_legacy_non_finite_times_are_rejected(literal: str, whole_file: bool) -> None:
    """NaN/Infinity are not JSON: the file is corrupt. A number that parses but is infinite
    or too large drops its entry. Either way nothing non-finite reaches a Grant."""
    g = Grant(Secret("tok"), "bearer", 100.0, 200.0)
    doc = json.loads(encode({"a": Stored("id-a", g), "b": Stored("id-b", g)}))
    doc["credentials"]["a"]["grant"]["expires_at"] = "@"
    data = json.dumps(doc).replace('"@"', literal).encode()
    if whole_file:
        with pytest.raises(StateError, match="not JSON"):
            decode(data)
    else:
        assert set(decode(data)) == {"b"}


def test_legacy_file_is_imported_once_then_removed(tmp_path: Path, log_lines: io.StringIO) -> None:
    entries = {"a": entry(1, rt="rt-1"), "b": Stored("id-b")}
    tmp_path.joinpath("tokens.json").write_bytes(encode(entries))
    state = StateFile(tmp_path)
    assert state.load() == entries
    assert not (tmp_path / "tokens.json").exists()  # a downgrade is not fed stale data
    assert "state.migrated" in log_lines.getvalue()
    assert mode(state.path) == 0o600
    state.close()
    assert StateFile(tmp_path).load() == entries
    assert sql(state.path, "SELECT count(*) FROM credentials") == [(2,)]


def test_a_leftover_legacy_file_loses_to_the_database(tmp_path: Path) -> None:
    state = StateFile(tmp_path)
    state.save({"a": entry(1)})
    tmp_path.joinpath("tokens.json").write_bytes(encode({"a": entry(2), "z": entry(3)}))
    assert StateFile(tmp_path).load() == {"a": entry(1)}
    assert not (tmp_path / "tokens.json").exists()


def test_a_corrupt_legacy_file_is_moved_aside(tmp_path: Path, log_lines: io.StringIO) -> None:
    tmp_path.joinpath("tokens.json").write_text("{garbage")
    assert StateFile(tmp_path).load() == {}
    assert "state.ignored" in log_lines.getvalue()
    assert [p.name.startswith("tokens.json.corrupt-") for p in tmp_path.iterdir()] == [True]


# -- the database ---------------------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    entries = {f"c{i}": entry(i, rt=f"rt-{i}" if i % 2 else None) for i in range(50)}
    entries["bare"] = Stored("id-bare")  # an identity with no token yet (a refresh chain)
    state = StateFile(tmp_path / "state")
    assert state.load() == {}
    state.save(entries)
    state.close()
    assert StateFile(tmp_path / "state").load() == entries
    assert sql(state.path, "PRAGMA journal_mode") == [("wal",)]


def test_only_changed_rows_are_written(tmp_path: Path) -> None:
    entries = {f"c{i}": entry(i) for i in range(200)}
    state = StateFile(tmp_path)
    state.load()
    state.save(entries)
    assert state.rows_written == 200
    files = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    # Equal values in new objects, and a grant that carries its rotated refresh token (not a
    # column): nothing to write, not a byte.
    state.save({n: Stored(s.identity, _copy(s.grant, Secret("rt"))) for n, s in entries.items()})
    assert state.rows_written == 200
    assert {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.iterdir()} == files
    changed = dict(entries)
    for i in (3, 77, 150):
        changed[f"c{i}"] = entry(i, token="new")
    changed["c5"] = Stored("id-5", entries["c5"].grant, Secret("rotated"))
    state.save(changed)
    assert state.rows_written == 204
    state.close()
    assert StateFile(tmp_path).load() == changed


def _copy(g: Grant | None, rotated: Secret) -> Grant:
    assert g is not None
    return Grant(Secret(g.access_token.reveal()), g.token_type, g.issued_at, g.expires_at, rotated)


def test_diff_is_pure_and_ignores_what_is_not_a_column() -> None:
    a, b = entry(1), entry(2)
    assert diff({}, {}) == ({}, [])
    assert diff({"a": a}, {"a": Stored(a.identity, _copy(a.grant, Secret("x")))}) == ({}, [])
    assert diff({"a": a, "b": b}, {"a": b, "c": a}) == ({"a": b, "c": a}, ["b"])
    assert diff({"a": a}, {"a": Stored(a.identity, a.grant, Secret("rt"))})[0] == {
        "a": Stored(a.identity, a.grant, Secret("rt"))
    }
    assert diff({"a": a}, {"a": Stored("other", a.grant)})[0] == {"a": Stored("other", a.grant)}


def test_deletes_and_put(tmp_path: Path) -> None:
    state = StateFile(tmp_path)
    state.load()
    state.save({"a": entry(1), "b": entry(2), "c": entry(3)})
    state.save({"a": entry(1)})
    assert state.rows_written == 5
    assert StateFile(tmp_path).load() == {"a": entry(1)}
    state.put({"a": None, "d": entry(4), "e": None})  # "e" was never there
    state.put({"d": entry(4)})  # unchanged
    assert state.rows_written == 7
    assert StateFile(tmp_path).load() == {"d": entry(4)}


def test_a_save_without_a_load_reads_the_database_first(tmp_path: Path) -> None:
    StateFile(tmp_path).save({"a": entry(1), "b": entry(2)})
    state = StateFile(tmp_path)
    state.save({"a": entry(1)})
    assert state.rows_written == 1  # the delete alone
    assert StateFile(tmp_path).load() == {"a": entry(1)}


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("CAST('nan' AS REAL)", "NULL"),  # SQLite keeps no NaN: it stores NULL
        ("1e999", "infinity"),
        ("-1e999", "-infinity"),
        ("9e300", "out of range"),
        ("'soon'", "text"),
        ("x'00'", "a blob"),
        ("NULL", "missing"),
    ],
)
def test_non_finite_or_foreign_times_drop_their_row(
    tmp_path: Path, log_lines: io.StringIO, value: str, why: str
) -> None:
    StateFile(tmp_path).save({"a": entry(1), "b": entry(2)})
    sql(tmp_path / "state.db", f"UPDATE credentials SET expires_at = {value} WHERE name = 'a'")  # noqa: S608
    state = StateFile(tmp_path)
    assert state.load() == {"b": entry(2)}, why
    assert "state.entry_ignored" in log_lines.getvalue()
    assert TOKEN not in log_lines.getvalue()
    assert sql(state.path, "SELECT name FROM credentials") == [("b",)]  # dropped for good


def test_a_non_finite_grant_is_never_restored(tmp_path: Path) -> None:
    """If a NaN or infinite time ever reached save, load still refuses it."""
    state = StateFile(tmp_path)
    state.save(
        {"a": Stored("id-a", grant(expires=math.nan)), "b": Stored("id-b", grant(expires=math.inf))}
    )
    assert StateFile(tmp_path).load() == {}


@pytest.mark.parametrize(("token", "token_type"), BAD_TOKENS)
def test_a_stored_token_imsd_would_refuse_from_ims_is_dropped(
    tmp_path: Path, token: str, token_type: str
) -> None:
    bad = Grant(Secret(token), token_type, 100.0, 200.0)
    StateFile(tmp_path).save({"a": Stored("id-a", bad), "b": entry(2)})
    assert StateFile(tmp_path).load() == {"b": entry(2)}


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("identity", "x'ff'"),  # not UTF-8
        ("name", "x'ff'"),
        ("refresh_token", "''"),
        ("token_type", "NULL"),
        ("access_token", "'a b'"),
    ],
)
def test_malformed_identities_and_strings_drop_their_row(
    tmp_path: Path, column: str, value: str
) -> None:
    StateFile(tmp_path).save({"a": entry(1, rt="rt"), "b": entry(2)})
    sql(tmp_path / "state.db", f"UPDATE credentials SET {column} = {value} WHERE name = 'a'")  # noqa: S608
    state = StateFile(tmp_path)
    assert state.load() == {"b": entry(2)}
    assert sql(state.path, "SELECT count(*) FROM credentials") == [(1,)]


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.write_bytes(b"{garbage" * 100), "not a usable SQLite database"),
        (lambda p: p.write_bytes(b""), "not an imsd state database (application_id 0)"),
        (
            lambda p: sql(p, "CREATE TABLE other (x)", "INSERT INTO other VALUES (1)"),
            "not an imsd state database (application_id 0)",
        ),
        (
            lambda p: sql(p, f"PRAGMA application_id = {0x696D7364}", "PRAGMA user_version = 2"),
            "unsupported state schema version 2",
        ),
        (
            lambda p: sql(p, f"PRAGMA application_id = {0x696D7364}", "PRAGMA user_version = 1"),
            "no credentials table",
        ),
    ],
    ids=["garbage", "empty", "foreign", "newer", "no-table"],
)
def test_an_unusable_database_is_ignored_and_moved_aside(
    tmp_path: Path, log_lines: io.StringIO, make: object, reason: str
) -> None:
    path = tmp_path / "state.db"
    assert callable(make)
    make(path)
    state = StateFile(tmp_path)
    assert state.load() == {}
    out = log_lines.getvalue()
    assert "state.ignored" in out
    assert reason in out
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("state.db.corrupt-")]
    assert len(aside) == 1
    assert not path.exists()
    state.save({"a": entry(1)})  # the next save starts afresh
    assert StateFile(tmp_path).load() == {"a": entry(1)}


def test_a_truncated_database_and_its_wal_are_moved_aside(
    tmp_path: Path, log_lines: io.StringIO
) -> None:
    state = StateFile(tmp_path)
    state.save({f"c{i}": entry(i) for i in range(300)})
    state.save({f"c{i}": entry(i, token="new") for i in range(300)})  # pages in the WAL
    state.close()
    data = (tmp_path / "state.db").read_bytes()
    (tmp_path / "state.db").write_bytes(data[: len(data) // 3])
    assert StateFile(tmp_path).load() == {}
    assert "state.ignored" in log_lines.getvalue()
    assert TOKEN not in log_lines.getvalue()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert not any(n.startswith("state.db-") for n in names)  # no WAL replayed into a new db


def test_a_database_that_breaks_while_running_is_replaced(
    tmp_path: Path, log_lines: io.StringIO
) -> None:
    StateFile(tmp_path).save({"a": entry(1)})
    (tmp_path / "state.db").write_bytes(b"\0" * 4096)
    state = StateFile(tmp_path)  # a save with no load: it reads the database first
    state.save({"a": entry(1), "b": entry(2)})
    assert "state.ignored" in log_lines.getvalue()
    assert StateFile(tmp_path).load() == {"a": entry(1), "b": entry(2)}


def test_a_database_found_corrupt_by_a_write_is_rebuilt_from_memory(
    tmp_path: Path, log_lines: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = StateFile(tmp_path)
    state.load()
    state.save({"a": entry(1), "b": entry(2)})
    real = StateFile._write
    calls = 0

    def corrupt_once(self: StateFile, *args: object, **kwargs: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            e = sqlite3.DatabaseError("database disk image is malformed")
            e.sqlite_errorcode = sqlite3.SQLITE_CORRUPT
            raise e
        real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(StateFile, "_write", corrupt_once)
    state.save({"a": entry(1), "b": entry(2, token="new")})
    assert "state.ignored" in log_lines.getvalue()
    assert len(list(tmp_path.glob("state.db.corrupt-*"))) == 1
    monkeypatch.undo()
    assert StateFile(tmp_path).load() == {"a": entry(1), "b": entry(2, token="new")}


def test_a_symlink_at_the_database_is_never_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"precious")
    (tmp_path / "state").mkdir(mode=0o700)
    (tmp_path / "state" / "state.db").symlink_to(target)
    state = StateFile(tmp_path / "state")
    assert state.load() == {}
    state.save({"a": entry(1)})
    assert target.read_bytes() == b"precious"
    assert not (tmp_path / "state" / "state.db").is_symlink()


def test_a_build_killed_before_its_rename_is_cleaned_up(tmp_path: Path) -> None:
    StateFile(tmp_path).save({"a": entry(1)})
    (tmp_path / ".state.db.tmp-0123456789abcdef").write_bytes(b"half built")
    assert StateFile(tmp_path).load() == {"a": entry(1)}
    assert not (tmp_path / ".state.db.tmp-0123456789abcdef").exists()


def test_a_rotated_refresh_token_is_durable_when_save_returns(tmp_path: Path) -> None:
    """A process killed (SIGKILL) the instant save returns still leaves the rotated token: it
    is committed, not buffered, and the commit was fsynced (``synchronous=FULL``)."""
    script = textwrap.dedent(
        """
        import os, signal, sys
        from pathlib import Path
        from imsd.model import Secret
        from imsd.persist import StateFile, Stored
        state = StateFile(Path(sys.argv[1]))
        old = state.load()["a"]
        state.save({"a": Stored(old.identity, old.grant, Secret("rotated-2"))})
        assert state._conn is not None
        assert state._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    StateFile(tmp_path).save({"a": entry(1, rt="rotated-1")})
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=False)
    assert proc.returncode == -9
    stored = StateFile(tmp_path).load()["a"]
    assert stored.refresh_token == Secret("rotated-2")


def test_state_file_modes(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "state")
    state.save({"a": Stored("x", Grant(Secret("tok"), "bearer", 1.0, 2.0))})
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    assert state.path.stat().st_mode & 0o777 == 0o600
    assert set(state.load()) == {"a"}


def test_a_database_made_by_hand_is_brought_to_0600(tmp_path: Path) -> None:
    StateFile(tmp_path).save({"a": entry(1)})
    for p in tmp_path.iterdir():
        os.chmod(p, 0o644)
    state = StateFile(tmp_path)
    assert state.load() == {"a": entry(1)}
    state.save({"a": entry(2)})
    assert {p.name: mode(p) for p in tmp_path.iterdir()} == {
        "state.db": 0o600,
        "state.db-wal": 0o600,
        "state.db-shm": 0o600,
    }


def test_state_dir_is_never_chmod_ed_through_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "shared"
    target.mkdir()
    os.chmod(target, 0o500)
    (tmp_path / "state").symlink_to(target)
    state = StateFile(tmp_path / "state")
    with pytest.raises(SinkError, match="not a directory \\(a symlink\\?\\); refusing"):
        state.save({"a": Stored("x", Grant(Secret("tok"), "bearer", 1.0, 2.0))})
    assert mode(target) == 0o500  # was chmod-ed 0700 through the link
    assert list(target.iterdir()) == []


def test_state_dir_and_parents_are_0700_under_umask_000(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        state = StateFile(tmp_path / "var" / "lib" / "imsd")
        state.save({"a": Stored("x", Grant(Secret("tok"), "bearer", 1.0, 2.0))})
    finally:
        os.umask(old)
    for d in (tmp_path / "var", tmp_path / "var" / "lib", tmp_path / "var" / "lib" / "imsd"):
        assert mode(d) == 0o700  # the parents were 0777
    assert {p.name: mode(p) for p in state.dir.iterdir()} == {
        "state.db": 0o600,  # SQLite gives -wal and -shm the database's mode
        "state.db-wal": 0o600,
        "state.db-shm": 0o600,
    }


def test_a_state_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root")
    planted = tmp_path / "state"
    planted.mkdir()
    os.chmod(planted, 0o500)
    os.chown(planted, 65534, 65534)
    with pytest.raises(SinkError, match="owned by uid 65534, not by imsd or root; refusing"):
        StateFile(planted).save({"a": Stored("x", Grant(Secret("tok"), "bearer", 1.0, 2.0))})
    assert list(planted.iterdir()) == []
    assert (mode(planted), planted.stat().st_uid) == (0o500, 65534)


@pytest.mark.anyio
async def test_restart_reuses_tokens_without_ims(tmp_path: Path, fake: FakeIms) -> None:
    s = make_settings(tmp_path)
    write_cred(s.credentials_dir, "alpha", fake)
    assert await run_once(s, load_registry(), give_up_after=10) == 0
    token = (s.output_dir / "alpha" / "token").read_text()
    (s.output_dir / "alpha" / "token").unlink()
    assert fake.state.request_count() == 1
    # A restart: same credential, valid token in the state dir → no IMS request.
    async with anyio.create_task_group() as tg:
        d = Daemon(s, load_registry())
        await tg.start(functools.partial(d.run, handle_signals=False))
        assert (s.output_dir / "alpha" / "token").read_text() == token
        tg.cancel_scope.cancel()
    assert fake.state.request_count() == 1
    # A changed secret invalidates the stored token.
    write_cred(s.credentials_dir, "alpha", fake, secret=SECRET2)
    assert await run_once(s, load_registry(), give_up_after=10) == 0
    assert fake.state.request_count() == 2
    assert (s.output_dir / "alpha" / "token").read_text() != token


@pytest.mark.anyio
@pytest.mark.parametrize("filename", ["state.db", "tokens.json"])
async def test_corrupt_state_is_reported_not_fatal(
    tmp_path: Path, fake: FakeIms, log_lines: io.StringIO, filename: str
) -> None:
    s = make_settings(tmp_path)
    write_cred(s.credentials_dir, "alpha", fake)
    os.makedirs(s.state_dir, exist_ok=True)
    (s.state_dir / filename).write_text("{garbage")
    assert await run_once(s, load_registry(), give_up_after=10) == 0
    assert "state.ignored" in log_lines.getvalue()
    assert [p.name.startswith(f"{filename}.corrupt-") for p in s.state_dir.glob("*.corrupt-*")] == [
        True
    ]
    assert StateFile(s.state_dir).load()["alpha"].grant is not None  # written cleanly


@pytest.mark.anyio
@pytest.mark.parametrize("value", ["CAST('nan' AS REAL)", "1e999", "'soon'"])
async def test_state_with_non_finite_times_is_ignored_not_fatal(
    tmp_path: Path, fake: FakeIms, value: str
) -> None:
    """A stored token whose times are NaN/inf under the right identity used to reach
    ``rfc3339`` at start and crash it; it is logged and ignored, and a token fetched anew."""
    s = make_settings(tmp_path)
    write_cred(s.credentials_dir, "alpha", fake)
    assert await run_once(s, load_registry(), give_up_after=10) == 0
    sql(s.state_dir / "state.db", f"UPDATE credentials SET expires_at = {value}")  # noqa: S608
    stream = io.StringIO()
    logs.configure("info", "json", stream)
    try:
        assert await run_once(s, load_registry(), give_up_after=10) == 0
    finally:
        logs.configure("warning", "json")
    assert "state.entry_ignored" in stream.getvalue()
    assert fake.state.request_count() == 2  # not restored: fetched again
    assert StateFile(s.state_dir).load()["alpha"].grant is not None  # written cleanly


@pytest.mark.anyio
async def test_a_legacy_state_file_is_imported_without_ims(tmp_path: Path, fake: FakeIms) -> None:
    """An upgrade from tokens.json costs IMS nothing: its tokens are imported and reused."""
    s = make_settings(tmp_path)
    write_cred(s.credentials_dir, "alpha", fake)
    assert await run_once(s, load_registry(), give_up_after=10) == 0
    entries = StateFile(s.state_dir).load()
    for p in s.state_dir.iterdir():
        p.unlink()
    (s.state_dir / "tokens.json").write_bytes(encode(entries))
    assert await run_once(s, load_registry(), give_up_after=10) == 0
    assert fake.state.request_count() == 1
    assert sorted(p.name for p in s.state_dir.iterdir() if not p.name.startswith("state.db-")) == [
        "state.db"
    ]
