"""One record per credential and the pure transitions between its states.

Theory of operation
-------------------
Everything the daemon knows about a credential lives in one frozen :class:`Record`: the
credential version in force, the token and the identity it was issued for, the rotating
refresh token, the failure bookkeeping, when the next fetch is due, and whether the current
token is on disk. A change of state is a function ``(record, event, now, …) → Step``: the
new record and the effects the driver (:mod:`imsd.supervisor`) must carry out, in order —
fetch, save the state, write the files, notify plugins, run the ``on_refresh`` action. No
function here does I/O, reads a clock or draws a random number: they are arguments, so every
transition is table- and property-tested (``tests/test_scheduler.py``).

Invariants the transitions keep:

- A failure (of a fetch or of a write) never drops a token: only a newer token for the same
  identity, or the removal of the credential, replaces it.
- A token is installed only for the identity it was requested for. A credential changed
  while its fetch was in flight gets the old answer discarded and a fetch after it.
- A rotated refresh token is saved (``Save(urgent=True)``) before the effects that publish
  the new access token (``Write``).
- The next fetch is due at ``next_refresh_at`` after a success, at ``retry_at`` after a
  failure (never sooner than the cap for a permanent error), and at once when the identity
  changes or a restored token is already inside its refresh margin (it is served meanwhile).
- :meth:`Record.wake_at` is the one time the driver's timer heap holds for a credential.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from imsd.model import Credential, CredentialState, Grant, ImsError, ImsErrorKind, Secret
from imsd.schedule import RefreshPolicy, next_refresh_at, retry_at, token_state, write_retry_at

__all__ = [
    "WRITE_ERROR_PREFIX",
    "Effect",
    "Fetch",
    "Notify",
    "Record",
    "RunAction",
    "Save",
    "Step",
    "Write",
    "added",
    "changed",
    "fetch_failed",
    "fetch_started",
    "fetch_succeeded",
    "file_failed",
    "file_resolved",
    "forced_refresh_at",
    "restored",
    "write_failed",
    "write_succeeded",
]

#: How a write error reads in ``last_error`` (the files, not IMS, failed).
WRITE_ERROR_PREFIX: Final = "writing outputs: "


# -- effects --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fetch:
    """Ask IMS for a token for the credential's current version."""


@dataclass(frozen=True, slots=True)
class Save:
    """Persist the state. *urgent*: before the next effect (a rotated refresh token must be
    durable before the access token it came with is published); else within a second."""

    urgent: bool = False


@dataclass(frozen=True, slots=True)
class Write:
    """Render and write the output files of *grant* (if it is still the current one)."""

    grant: Grant


@dataclass(frozen=True, slots=True)
class Notify:
    hook: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RunAction:
    """Run the credential's ``on_refresh`` action (a new token's files are on disk)."""


Effect = Fetch | Save | Write | Notify | RunAction


# -- the record -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    name: str
    path: Path
    credential: Credential | None = None  # the version in force (the last good one)
    file_error: str | None = None  # the credential file is currently broken
    grant: Grant | None = None
    grant_identity: str | None = None  # the identity the grant was issued for
    refresh_token: Secret | None = None  # newest of a rotating chain, for credential's identity
    consecutive_failures: int = 0
    fetch_error: str | None = None
    error_kind: ImsErrorKind | None = None
    debug_id: str | None = None  # IMS's x-debug-id of the answer behind fetch_error
    last_refresh: float | None = None  # wall clock of the last success (or restored issue)
    attempted_at: float = -math.inf  # wall clock when the last fetch began
    due: float = 0.0  # wall clock of the next fetch; inf: none (no usable credential)
    fetching: str | None = None  # identity of the fetch in flight
    write_pending: bool = False  # the current grant's files are not on disk yet
    write_attempt: int = 0
    write_due: float = math.inf
    write_error: str | None = None
    outputs_incomplete: bool = False  # some files could not be rendered (see write_error)
    announced: Grant | None = None  # the last grant whose files were announced
    attempted: bool = False  # a first fetch (or restored write) has finished

    # -- reading ---------------------------------------------------------------------------

    @property
    def last_error(self) -> str | None:
        """The last refresh or write error (safe to show)."""
        return self.write_error or self.fetch_error

    def state(self, now: float) -> CredentialState:
        if self.credential is None:
            return CredentialState.INVALID
        failing = self.consecutive_failures > 0 or self.outputs_incomplete
        return token_state(self.grant, now, failing=failing)

    def error(self) -> str | None:
        """The most relevant error to show: a broken file wins over a failed refresh."""
        return self.file_error or self.last_error

    def error_debug_id(self) -> str | None:
        """IMS's ``x-debug-id`` for :meth:`error`, when that is the failed refresh."""
        shown = self.error()
        return self.debug_id if shown is not None and shown == self.fetch_error else None

    def wake_at(self) -> float:
        """When the driver must look at this record again (inf: only an event wakes it)."""
        fetch = self.due if self.fetching is None and self.credential is not None else math.inf
        write = self.write_due if self.write_pending else math.inf
        return min(fetch, write)

    def serving(self, identity: str) -> Grant | None:
        """The grant, if it was issued for *identity*."""
        return self.grant if self.grant_identity == identity else None


Step = tuple[Record, tuple[Effect, ...]]


def _failure(name: str, error: str | None) -> Notify:
    """Plugins hear of every failure: of the file, of a fetch, of a write."""
    return Notify("imsd_credential_failed", {"credential": name, "error": error})


# -- the credential file --------------------------------------------------------------------


def added(name: str, path: Path, cred: Credential, now: float) -> Step:
    """A new credential (or the first valid version of a broken file): fetch now."""
    return Record(name, path, credential=cred, due=now), (Fetch(),)


def restored(
    rec: Record,
    *,
    identity: str,
    grant: Grant | None,
    refresh_token: Secret | None,
    now: float,
    policy: RefreshPolicy,
    rand: float,
) -> Step:
    """What a previous run saved, offered to a freshly added record. Reused only under the
    same identity. A token still valid is served and written out; one inside its refresh
    margin is also fetched again at once (valid but due), so an IMS outage at restart does
    not take a still-good token away."""
    cred = rec.credential
    if cred is None or identity != cred.identity:
        return rec, ()
    rec = replace(rec, refresh_token=refresh_token)
    if grant is None or grant.expires_at <= now:
        return rec, ()
    due = max(now, next_refresh_at(grant, policy, rand))
    if grant.expires_at - now <= policy.min_margin:
        due = now
    rec = replace(
        rec,
        grant=grant,
        grant_identity=identity,
        last_refresh=grant.issued_at,
        due=due,
        write_pending=True,
        write_due=now,
        write_attempt=0,
    )
    return rec, (Write(grant),)


def changed(rec: Record, cred: Credential, now: float) -> Step:
    """A new valid version of the file. A new identity (client id, secret, scopes, IMS
    host, auth options) needs a new token: fetch now, and start a new refresh-token chain
    (the file's own token). The same identity re-renders the files of the current token,
    and retries at once a credential that was failing (the fix may be in the file)."""
    old = rec.credential
    rec = replace(rec, credential=cred, file_error=None)
    if old is None or old.identity != cred.identity:
        rec = replace(rec, due=now, refresh_token=None)
        return rec, (() if rec.fetching is not None else (Fetch(),))
    if rec.consecutive_failures or rec.grant is None:
        rec = replace(rec, due=now)
        return rec, (() if rec.fetching is not None else (Fetch(),))
    grant = rec.grant
    rec = replace(rec, write_pending=True, write_due=now, write_attempt=0)
    return rec, (Write(grant),)


def file_failed(rec: Record, error: str) -> Step:
    """The file is broken now; the last good version (if any) keeps running."""
    return replace(rec, file_error=error), (_failure(rec.name, error),)


def file_resolved(rec: Record) -> Step:
    return replace(rec, file_error=None), ()


# -- fetching -------------------------------------------------------------------------------


def fetch_started(rec: Record, now: float) -> Record:
    assert rec.credential is not None
    return replace(rec, fetching=rec.credential.identity, attempted_at=now)


def _stale_answer(rec: Record, identity: str) -> bool:
    """The answer is for a version that is no longer in force (changed meanwhile)."""
    return rec.credential is None or rec.credential.identity != identity


def fetch_succeeded(
    rec: Record, identity: str, grant: Grant, now: float, policy: RefreshPolicy, rand: float
) -> Step:
    # One replace per transition, not two: each copies the record's 22 fields (6 µs).
    if _stale_answer(rec, identity):
        return replace(rec, fetching=None, due=now), (Fetch(),)
    rotated = grant.refresh_token is not None
    rec = replace(
        rec,
        fetching=None,
        grant=grant,
        grant_identity=identity,
        refresh_token=grant.refresh_token if rotated else rec.refresh_token,
        consecutive_failures=0,
        fetch_error=None,
        error_kind=None,
        debug_id=None,
        last_refresh=now,
        due=next_refresh_at(grant, policy, rand),
        write_pending=True,
        write_due=now,
        write_attempt=0,
        write_error=None,
    )
    # ``attempted`` waits for the files: READY means every token is on disk.
    # The chain has one link: the rotated refresh token is durable before anyone sees the
    # access token it came with (a crash in between would lose the only valid link).
    return rec, (Save(urgent=rotated), Write(grant))


def fetch_failed(
    rec: Record, identity: str, error: ImsError, now: float, policy: RefreshPolicy, rand: float
) -> Step:
    if _stale_answer(rec, identity):
        return replace(rec, fetching=None, due=now), (Fetch(),)
    failures = rec.consecutive_failures + 1
    expires = rec.grant.expires_at if rec.grant is not None else None
    rec = replace(
        rec,
        fetching=None,
        consecutive_failures=failures,
        fetch_error=str(error),
        error_kind=error.kind,
        debug_id=error.debug_id,
        due=retry_at(now, error, failures, policy, rand, expires),
        attempted=True,
    )
    return rec, (_failure(rec.name, str(error)),)


def forced_refresh_at(rec: Record, min_interval: float) -> float | None:
    """When a forced refresh may next reach IMS: *min_interval* after the last attempt or
    success, whatever its outcome, and not before the retry that the backoff (or a
    ``Retry-After``) set for a failing credential. None while a fetch is in flight: joining
    it costs IMS nothing."""
    if rec.fetching is not None:
        return None
    last = max(rec.attempted_at, rec.last_refresh if rec.last_refresh is not None else -math.inf)
    at = last + min_interval
    if rec.error_kind is not None:
        at = max(at, rec.due)
    return at


# -- writing --------------------------------------------------------------------------------


def write_succeeded(rec: Record, grant: Grant, now: float, left_out: str | None = None) -> Step:
    """The files of *grant* are on disk (all of them, or all but *left_out*, which cannot be
    rendered safely: no retry, the same inputs render the same)."""
    if grant is not rec.grant:
        return rec, ()  # a newer token is pending its own write
    announce = rec.announced is not grant
    rec = replace(
        rec,
        write_pending=False,
        write_attempt=0,
        write_due=math.inf,
        write_error=WRITE_ERROR_PREFIX + left_out if left_out else None,
        outputs_incomplete=bool(left_out),
        attempted=True,
        announced=grant,
    )
    effects: list[Effect] = []
    if left_out:
        effects.append(_failure(rec.name, rec.write_error))
    if announce:
        effects += [
            RunAction(),
            Notify(
                "imsd_token_refreshed", {"credential": rec.name, "expires_at": grant.expires_at}
            ),
        ]
    return rec, tuple(effects)


def write_failed(
    rec: Record, grant: Grant, error: str, now: float, policy: RefreshPolicy, rand: float
) -> Step:
    """The files could not be written: the old ones stay; retried without an IMS request,
    within seconds once the disk has room, never past the token's expiry."""
    if grant is not rec.grant:
        return rec, ()
    attempt = rec.write_attempt + 1
    rec = replace(
        rec,
        write_attempt=attempt,
        write_error=WRITE_ERROR_PREFIX + error,
        write_due=write_retry_at(now, attempt, policy, rand, grant.expires_at),
        attempted=True,
    )
    return rec, (_failure(rec.name, rec.write_error),)
