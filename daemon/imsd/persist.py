"""The state database: tokens (and rotated refresh tokens) that survive a restart.

Theory of operation. ``STATE_DIR/state.db`` is an SQLite database (WAL mode) with one row per
credential: the grant, the rotated refresh token and the *identity* of the credential that
obtained them (a hash of auth method, client id, secret, org, scopes and IMS host). On start a
stored token is reused only under the same identity and while it is still valid, so a restart
costs IMS nothing, and a changed secret or scope can never serve a stale token.

:class:`StateFile` keeps an in-memory copy of what the database holds. ``save(entries)``
compares the wanted state with it and, in one transaction, writes only the rows that differ
and deletes the names that are gone; nothing at all when nothing changed. So bytes written
follow what changed (a few pages per refreshed token), not the number of credentials, as the
old ``tokens.json`` rewrite did. Every commit is ``synchronous=FULL``: the WAL is fsynced
before ``save`` returns, so a rotated refresh token is durable before it is published, and a
crash (kill -9, power loss) at any point leaves the last committed state.

Files. The database appears complete or not at all: it is built as a temporary
``.state.db.tmp-RANDOM`` (created by us with mode 0600 before SQLite opens it, so the
``-wal`` and ``-shm`` files, which SQLite creates with the database's mode, are 0600 too),
fsynced and renamed into place. A corrupt, foreign or newer-schema database is logged
(``state.ignored``), never fatal, and moved aside to ``state.db.corrupt-TIMESTAMP`` (its WAL
beside it) so that the next save starts afresh; rows whose values fail the checks that IMS
answers are held to are dropped (``state.entry_ignored``). A ``tokens.json`` of version 1
(the previous format) is imported on the first load and then removed, so that a downgraded
imsd does not silently read stale data; if a database exists, it wins and a leftover
``tokens.json`` is removed.

One writer: the methods take a lock and may run in any worker thread. Row encoding and
validation are pure; :class:`StateFile` does the I/O.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog

from imsd.flows import is_bearer_token
from imsd.model import Grant, Secret, usable_time
from imsd.sinks import open_private_dir, remove_stale_temporaries

__all__ = [
    "SCHEMA_VERSION",
    "STATE_VERSION",
    "StateError",
    "StateFile",
    "Stored",
    "decode",
    "decode_row",
    "diff",
    "encode",
    "encode_row",
]

log = structlog.get_logger("imsd.persist")

FILENAME: Final = "state.db"
SCHEMA_VERSION: Final = 1  # PRAGMA user_version
APPLICATION_ID: Final = 0x696D7364  # "imsd": PRAGMA application_id, tells our database apart
#: How long a save waits for a lock another process (``sqlite3`` on the command line) holds.
BUSY_TIMEOUT: Final = 5.0

LEGACY_FILENAME: Final = "tokens.json"
STATE_VERSION: Final = 1  # of tokens.json
_KIND: Final = "imsd-state"

_SCHEMA: Final = """
CREATE TABLE credentials (
    name          TEXT PRIMARY KEY NOT NULL,
    identity      TEXT NOT NULL,
    access_token  TEXT,
    token_type    TEXT,
    issued_at     REAL,
    expires_at    REAL,
    refresh_token TEXT
)"""
_SELECT: Final = (
    "SELECT rowid, name, identity, access_token, token_type, issued_at, expires_at, "
    "refresh_token FROM credentials"
)
#: As ``PRAGMA table_info`` names them (bytes: the connection reads text as bytes).
_COLUMNS: Final = frozenset(
    {
        b"name",
        b"identity",
        b"access_token",
        b"token_type",
        b"issued_at",
        b"expires_at",
        b"refresh_token",
    }
)
_UPSERT: Final = (
    "INSERT INTO credentials (name, identity, access_token, token_type, issued_at, "
    "expires_at, refresh_token) VALUES (?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (name) DO UPDATE SET identity = excluded.identity, "
    "access_token = excluded.access_token, token_type = excluded.token_type, "
    "issued_at = excluded.issued_at, expires_at = excluded.expires_at, "
    "refresh_token = excluded.refresh_token"
)
_SIDECARS: Final = ("-wal", "-shm")
_NOT_A_DATABASE: Final = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

Row = tuple[str, str, str | None, str | None, float | None, float | None, str | None]


class StateError(ValueError):
    """The state cannot be used; the message never contains a token."""


@dataclass(frozen=True, slots=True)
class Stored:
    identity: str
    grant: Grant | None = None
    refresh_token: Secret | None = None


# -- pure: rows and the legacy JSON file ------------------------------------------------------


def same(a: Stored | None, b: Stored) -> bool:
    """Whether *a* and *b* make the same row. ``Grant.refresh_token`` is not stored (the
    rotated token is ``Stored.refresh_token``), so it must not make a row look changed."""
    if a is b:
        return True
    if a is None or a.identity != b.identity or a.refresh_token != b.refresh_token:
        return False
    if a.grant is b.grant:
        return True
    if a.grant is None or b.grant is None:
        return False
    return (a.grant.access_token, a.grant.token_type, a.grant.issued_at, a.grant.expires_at) == (
        b.grant.access_token,
        b.grant.token_type,
        b.grant.issued_at,
        b.grant.expires_at,
    )


def diff(
    known: Mapping[str, Stored], wanted: Mapping[str, Stored]
) -> tuple[dict[str, Stored], list[str]]:
    """The rows to write and the names to delete to turn *known* into *wanted*. Runs on
    every save over every credential: a few hundred ns each when nothing changed."""
    upserts: dict[str, Stored] = {}
    present = 0
    get = known.get
    for name, s in wanted.items():
        k = get(name)
        if k is not None:
            present += 1
        if k is not s and not same(k, s):
            upserts[name] = s
    deletes = [n for n in known if n not in wanted] if present < len(known) else []
    return upserts, deletes


def encode_row(name: str, s: Stored) -> Row:
    g = s.grant
    return (
        name,
        s.identity,
        g.access_token.reveal() if g else None,
        g.token_type if g else None,
        g.issued_at if g else None,
        g.expires_at if g else None,
        s.refresh_token.reveal() if s.refresh_token else None,
    )


def decode_row(row: tuple[object, ...]) -> tuple[str, Stored]:
    """A database row → (name, Stored); StateError if any value fails the checks. Text is
    read as bytes (``text_factory=bytes``) so that undecodable text drops its row alone."""
    try:
        values = [v.decode() if type(v) is bytes else v for v in row]
    except UnicodeDecodeError:
        raise StateError("a text value is not UTF-8") from None
    if len(values) != 7:
        raise StateError("row has the wrong number of columns")
    name, identity, token, ttype, issued, expires, rt = values
    if not isinstance(name, str) or not name:
        raise StateError("row lacks a name")
    if not isinstance(identity, str):
        raise StateError("entry lacks an identity")
    grant = None
    if token is not None or ttype is not None or issued is not None or expires is not None:
        # NaN is stored as NULL: rejected like any missing time.
        raw = {
            "access_token": token,
            "token_type": ttype,
            "issued_at": issued,
            "expires_at": expires,
        }
        grant = _grant(raw)
    if rt is not None and not (isinstance(rt, str) and rt):
        raise StateError("refresh_token is not a string")
    return name, Stored(identity, grant, Secret(rt) if rt else None)


def encode(entries: Mapping[str, Stored]) -> bytes:
    """The legacy ``tokens.json`` (version 1); kept for tests and the bench's baseline."""
    creds: dict[str, Any] = {}
    for name, s in sorted(entries.items()):
        item: dict[str, Any] = {"identity": s.identity}
        if s.grant is not None:
            item["grant"] = {
                "access_token": s.grant.access_token.reveal(),
                "token_type": s.grant.token_type,
                "issued_at": s.grant.issued_at,
                "expires_at": s.grant.expires_at,
            }
        if s.refresh_token is not None:
            item["refresh_token"] = s.refresh_token.reveal()
        creds[name] = item
    doc = {"kind": _KIND, "version": STATE_VERSION, "credentials": creds}
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


def _grant(raw: Any) -> Grant:
    if not isinstance(raw, dict):
        raise StateError("grant is not an object")
    token, ttype = raw.get("access_token"), raw.get("token_type", "bearer")
    issued, expires = raw.get("issued_at"), raw.get("expires_at")
    if not isinstance(token, str) or not token or not isinstance(ttype, str):
        raise StateError("grant lacks an access token")
    if not is_bearer_token(token) or ttype.lower() != "bearer":
        raise StateError("grant is not a bearer token")  # what IMS answers are held to
    if not (usable_time(issued) and usable_time(expires)):
        raise StateError("grant times are not finite numbers in range")
    assert isinstance(issued, int | float)
    assert isinstance(expires, int | float)
    if expires <= issued:
        raise StateError("grant expires before it was issued")
    return Grant(Secret(token), ttype, float(issued), float(expires))


def _not_json(name: str) -> Any:
    """NaN and Infinity are not JSON (RFC 8259), although Python's parser accepts them."""
    raise ValueError(name)


def decode(data: bytes) -> dict[str, Stored]:
    """Parse a legacy ``tokens.json``; raise StateError for anything but a well-formed
    version 1. Individual malformed entries are dropped (``state.entry_ignored``)."""
    try:
        doc = json.loads(data, parse_constant=_not_json)
    except (ValueError, UnicodeDecodeError):
        raise StateError("not JSON") from None
    if not isinstance(doc, dict) or doc.get("kind") != _KIND:
        raise StateError("not an imsd state file")
    if doc.get("version") != STATE_VERSION:
        raise StateError(f"unsupported state version {doc.get('version')!r}")
    creds = doc.get("credentials")
    if not isinstance(creds, dict):
        raise StateError("credentials is not an object")
    out: dict[str, Stored] = {}
    for name, item in creds.items():
        try:
            if not isinstance(item, dict) or not isinstance(item.get("identity"), str):
                raise StateError("entry lacks an identity")
            grant = _grant(item["grant"]) if "grant" in item else None
            rt = item.get("refresh_token")
            if rt is not None and not (isinstance(rt, str) and rt):
                raise StateError("refresh_token is not a string")
            out[str(name)] = Stored(item["identity"], grant, Secret(rt) if rt else None)
        except StateError as e:
            log.warning("state.entry_ignored", credential=str(name), reason=str(e))
    return out


# -- I/O ----------------------------------------------------------------------------------------


def _io_error(path: Path, e: sqlite3.Error | ValueError) -> OSError:
    # SQLite's messages name tables and columns, never a bound value: no token can leak.
    return OSError(errno.EIO, f"{path}: {e}")


def _is_not_a_database(e: sqlite3.Error) -> bool:
    return (getattr(e, "sqlite_errorcode", 0) & 0xFF) in _NOT_A_DATABASE


class StateFile:
    """Load once at start, then save the wanted state (or :meth:`put` changes) from any
    thread; only what differs from the database is written."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.path = state_dir / FILENAME
        self.legacy_path = state_dir / LEGACY_FILENAME
        #: Rows inserted, updated or deleted by this object (the bench and tests read it).
        self.rows_written = 0
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        # What the database holds (valid rows), or None before it was read.
        self._known: dict[str, Stored] | None = None

    # -- public ---------------------------------------------------------------------------------

    def load(self) -> dict[str, Stored]:
        """The stored entries; {} (logged) if there are none or they cannot be used."""
        for name in (LEGACY_FILENAME, FILENAME):  # a write or a build killed before its rename
            remove_stale_temporaries(self.dir, name)
        with self._lock:
            self._close()
            try:
                entries = self._attach()
            except StateError as e:
                self._discard(str(e))
                entries = {}
            except OSError as e:
                log.error("state.unreadable", path=str(self.path), error=e.strerror or str(e))
                return {}  # _known stays None: a save reads the database again first
            if self._conn is None:
                entries = self._migrate()
            elif self.legacy_path.exists():
                self._remove_legacy("state.db exists")
            log.info("state.loaded", path=str(self.path), credentials=len(entries))
            return dict(entries)

    def save(self, entries: Mapping[str, Stored]) -> None:
        """Make the database hold exactly *entries*, writing only what differs. Raises
        OSError (the message never holds a token); a failed save is redone by the next."""
        with self._lock:
            known = self._ensure_known()
            upserts, deletes = diff(known, entries)
            if upserts or deletes:
                self._apply(lambda: dict(entries), upserts, deletes)

    def put(self, changes: Mapping[str, Stored | None]) -> bool:
        """For a caller that knows what changed: set these names, delete those mapped to
        None; the others are left as they are. False when there was no usable database to
        change (none yet, or a corrupt one moved aside): the new one holds only what the
        database knew plus *changes*, and the caller should :meth:`save` everything."""
        with self._lock:
            known = self._ensure_known()
            upserts = {
                n: s for n, s in changes.items() if s is not None and not same(known.get(n), s)
            }
            deletes = {n for n, s in changes.items() if s is None and n in known}
            if not (upserts or deletes):
                return self._conn is not None
            return self._apply(
                lambda: {n: s for n, s in known.items() if n not in deletes} | upserts,
                upserts,
                deletes,
            )

    def close(self) -> None:
        with self._lock:
            self._close()

    # -- reading ----------------------------------------------------------------------------------

    def _attach(self) -> dict[str, Stored]:
        """Open the database if there is one and read it; sets _conn and _known. Raises
        StateError if the file is not a usable state database, OSError if it cannot tell."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            self._known = {}
            return {}
        if not stat.S_ISREG(st.st_mode):
            raise StateError("not a regular file")
        self._fix_modes()  # before SQLite opens them: closing an fd would drop its locks
        try:
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as e:
            raise _io_error(self.path, e) from None
        try:
            entries, bad = self._read(conn)
            if bad:  # dropped for good: a save only deletes the rows it knows of
                try:
                    self._write(conn, (), (), bad)
                except sqlite3.Error as e:  # they stay, and are dropped again at each load
                    log.warning("state.cleanup_failed", path=str(self.path), error=str(e))
            self._conn, self._known = conn, dict(entries)
            return entries
        except sqlite3.Error as e:
            conn.close()
            if _is_not_a_database(e):
                raise StateError(f"not a usable SQLite database: {e}") from None
            raise _io_error(self.path, e) from None
        except BaseException:
            conn.close()
            raise

    def _read(self, conn: sqlite3.Connection) -> tuple[dict[str, Stored], list[int]]:
        conn.text_factory = bytes  # undecodable text then drops one row, not the database
        app = conn.execute("PRAGMA application_id").fetchone()[0]
        if app != APPLICATION_ID:
            raise StateError(f"not an imsd state database (application_id {app})")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            raise StateError(f"unsupported state schema version {version}")
        check = conn.execute("PRAGMA quick_check").fetchall()
        if check != [(b"ok",)]:
            raise StateError("integrity check failed")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")  # a commit is on disk when save returns
        columns = {r[1] for r in conn.execute("PRAGMA table_info(credentials)")}
        if not columns >= _COLUMNS:  # checked first: a failing SELECT may be a disk error
            raise StateError("not an imsd state database (no credentials table)")
        rows = conn.execute(_SELECT).fetchall()
        entries: dict[str, Stored] = {}
        bad: list[int] = []
        for rowid, *row in rows:
            try:
                name, stored = decode_row(tuple(row))
            except StateError as e:
                raw = row[0]
                label = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
                log.warning("state.entry_ignored", credential=label, reason=str(e))
                bad.append(rowid)
                continue
            entries[name] = stored
        return entries, bad

    def _ensure_known(self) -> dict[str, Stored]:
        if self._known is None:
            try:
                self._attach()
            except StateError as e:
                self._discard(str(e))
        assert self._known is not None
        return self._known

    def _fix_modes(self) -> None:
        """A database, WAL or shm file of ours that is not 0600 (made by hand, restored from
        a backup) is brought to 0600, through a descriptor that never follows a symlink."""
        for path in (self.path, *(Path(f"{self.path}{s}") for s in _SIDECARS)):
            try:
                if stat.S_IMODE(os.lstat(path).st_mode) == 0o600:
                    continue  # the usual case: no descriptor opened at all
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue  # absent, or a symlink (never chmod-ed through)
            try:
                st = os.fstat(fd)
                if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != 0o600:
                    os.fchmod(fd, 0o600)
            finally:
                os.close(fd)

    # -- writing ----------------------------------------------------------------------------------

    def _apply(
        self,
        target: Callable[[], dict[str, Stored]],
        upserts: Mapping[str, Stored],
        deletes: Iterable[str],
    ) -> bool:
        """Write the changes; True if into the existing database, False if a new one had to
        be built (from *target*, only called then: a copy of every row costs at 10,000)."""
        # Never through a symlink, never a directory another user planted: it holds secrets.
        dir_fd = open_private_dir(self.dir, 0o700)
        try:
            if self._conn is None:
                self._create(dir_fd, target())
                return False
            try:
                self._write(self._conn, [encode_row(n, s) for n, s in upserts.items()], deletes)
            except sqlite3.Error as e:
                if not _is_not_a_database(e):
                    raise _io_error(self.path, e) from None
                self._discard(f"not a usable SQLite database: {e}")  # broken since it was read
                self._create(dir_fd, target())
                return False
            except ValueError as e:  # a string SQLite cannot take (a lone surrogate)
                raise _io_error(self.path, e) from None
            known = self._known
            assert known is not None
            known.update(upserts)
            for n in deletes:
                known.pop(n, None)
            return True
        finally:
            os.close(dir_fd)

    def _write(
        self,
        conn: sqlite3.Connection,
        rows: Iterable[Row],
        names: Iterable[str],
        rowids: Iterable[int] = (),
    ) -> None:
        """One transaction: every change is committed (and fsynced) or none."""
        before = conn.total_changes
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(_UPSERT, rows)
            conn.executemany("DELETE FROM credentials WHERE name = ?", ((n,) for n in names))
            conn.executemany("DELETE FROM credentials WHERE rowid = ?", ((r,) for r in rowids))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise
        self.rows_written += conn.total_changes - before

    def _create(self, dir_fd: int, entries: Mapping[str, Stored]) -> None:
        """Build a database holding *entries* beside the final name and rename it into
        place: ``state.db`` is complete or absent, never half made."""
        tmp = f".{FILENAME}.tmp-{secrets.token_hex(8)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask; SQLite gives -wal and -shm this mode
            conn = sqlite3.connect(self.dir / tmp, isolation_level=None)
            try:
                # No journal: a crash leaves only the temporary, which start-up removes.
                conn.execute("PRAGMA journal_mode = OFF")
                conn.execute("PRAGMA synchronous = OFF")  # one fsync below instead
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("BEGIN")
                conn.execute(_SCHEMA)
                conn.executemany(_UPSERT, [encode_row(n, s) for n, s in entries.items()])
                conn.execute("COMMIT")
                conn.execute("PRAGMA journal_mode = WAL")  # persistent, in the header
            finally:
                conn.close()
            os.fsync(fd)
            for suffix in _SIDECARS:  # a WAL without its database would be replayed into ours
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(FILENAME + suffix, dir_fd=dir_fd)
            os.rename(tmp, FILENAME, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.fsync(dir_fd)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            if isinstance(e, sqlite3.Error | ValueError):
                raise _io_error(self.path, e) from None
            raise
        finally:
            os.close(fd)
        self.rows_written += len(entries)
        try:
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
            conn.text_factory = bytes
            conn.execute("PRAGMA synchronous = FULL")  # a commit is on disk when save returns
        except sqlite3.Error as e:  # the database is in place: the next save reads it
            self._conn, self._known = None, None
            raise _io_error(self.path, e) from None
        self._conn, self._known = conn, dict(entries)

    # -- what is not ours to read -----------------------------------------------------------------

    def _discard(self, reason: str) -> None:
        """Log and move the database aside (its WAL with it) so the next save starts afresh."""
        self._close()
        moved = self._move_aside(FILENAME, _SIDECARS)
        log.error("state.ignored", path=str(self.path), reason=reason, moved_to=moved)
        self._known = {}

    def _move_aside(self, name: str, sidecars: tuple[str, ...] = ()) -> str | None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        try:
            dir_fd = os.open(self.dir, _DIR_FLAGS)
        except OSError as e:
            log.error("state.move_failed", path=str(self.dir), error=e.strerror)
            return None
        try:
            aside = f"{name}.corrupt-{stamp}"
            n = 0
            while any(_exists(aside + s, dir_fd) for s in ("", *sidecars)):
                n += 1
                aside = f"{name}.corrupt-{stamp}.{n}"
            for suffix in sidecars:  # first: a WAL left alone would be replayed into a new db
                if suffix == "-shm":  # rebuilt from the WAL; nothing to keep
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name + suffix, dir_fd=dir_fd)
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.rename(name + suffix, aside + suffix, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.rename(name, aside, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.fsync(dir_fd)
        except OSError as e:
            log.error("state.move_failed", path=str(self.dir / name), error=e.strerror)
            return None
        finally:
            os.close(dir_fd)
        return str(self.dir / aside)

    def _migrate(self) -> dict[str, Stored]:
        """Import a legacy tokens.json into a new database, then remove it."""
        try:
            data = self.legacy_path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as e:
            log.error("state.unreadable", path=str(self.legacy_path), error=e.strerror)
            return {}
        try:
            entries = decode(data)
        except StateError as e:
            moved = self._move_aside(LEGACY_FILENAME)
            log.error("state.ignored", path=str(self.legacy_path), reason=str(e), moved_to=moved)
            return {}
        try:
            dir_fd = open_private_dir(self.dir, 0o700)
            try:
                self._create(dir_fd, entries)
            finally:
                os.close(dir_fd)
        except OSError as e:  # use what was read; the next save builds the database
            log.error("state.migrate_failed", path=str(self.path), error=str(e))
            return entries
        self._remove_legacy("imported")
        log.info("state.migrated", path=str(self.path), credentials=len(entries))
        return entries

    def _remove_legacy(self, why: str) -> None:
        try:
            self.legacy_path.unlink()
        except OSError as e:
            log.warning("state.legacy_left", path=str(self.legacy_path), error=e.strerror)
            return
        log.info("state.legacy_removed", path=str(self.legacy_path), reason=why)

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn, self._known = None, None


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True
