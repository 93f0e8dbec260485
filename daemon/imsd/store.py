"""The token store: the current :class:`~imsd.scheduler.Record` of every credential.

Readers (the socket API, metrics, health, the daemon's status line) get frozen records: they
cannot change what they read, and a record they hold stays consistent while the supervisor
installs newer ones. Only :mod:`imsd.supervisor` calls :meth:`TokenStore.put` and
:meth:`TokenStore.remove`. It does no I/O.

Theory of operation (the counts)
--------------------------------
The ``STATUS=`` line and ``/readyz`` want the number of credentials in each state every few
seconds; walking 10,000 records for it was most of an idle daemon's work. So the counts are
kept as records come and go: each record is counted in its state as of the latest time
:meth:`TokenStore.counts` was asked about. The only change time makes on its own is a token
expiring (valid or stale becomes expired), so every counted token sits on a heap by expiry;
``counts(now)`` pops what expired by *now*, an entry whose record has moved on to another
grant being skipped (lazy deletion). A clock that went back recounts from scratch.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterator

from imsd.model import CredentialState, Grant
from imsd.scheduler import Record

__all__ = ["Entry", "TokenStore"]

#: What readers see of a credential (the scheduler's record, read-only).
Entry = Record

_EXPIRING = (CredentialState.VALID, CredentialState.STALE)


class TokenStore:
    def __init__(self) -> None:
        self._records: dict[str, Record] = {}
        self._counted: dict[str, CredentialState] = {}
        self._counts = dict.fromkeys(CredentialState, 0)
        self._expiries: list[tuple[float, int, str, Grant]] = []
        self._seq = itertools.count()
        self._now = -math.inf  # the time the counts are as of

    def __contains__(self, name: object) -> bool:
        return name in self._records

    def __iter__(self) -> Iterator[Record]:
        return iter(list(self._records.values()))

    def __len__(self) -> int:
        return len(self._records)

    def get(self, name: str) -> Record | None:
        return self._records.get(name)

    def put(self, record: Record) -> None:
        name = record.name
        before = self._records.get(name)
        was = self._uncount(name)
        self._records[name] = record
        state = self._counted[name] = record.state(self._now)
        self._counts[state] += 1
        grant = record.grant
        # The same grant still counted as unexpired already has its heap entry.
        queued = was in _EXPIRING and before is not None and before.grant is grant
        if state in _EXPIRING and grant is not None and not queued:
            heapq.heappush(self._expiries, (grant.expires_at, next(self._seq), name, grant))
            if len(self._expiries) > 2 * len(self._records) + 64:
                self._recount(self._now)

    def remove(self, name: str) -> Record | None:
        self._uncount(name)
        return self._records.pop(name, None)

    def snapshot(self) -> list[Record]:
        return sorted(self._records.values(), key=lambda r: r.name)

    def counts(self, now: float) -> dict[CredentialState, int]:
        """Credentials per state at *now*."""
        if now < self._now:
            self._recount(now)
        self._now = now
        heap = self._expiries
        while heap and heap[0][0] <= now:
            _, _, name, grant = heapq.heappop(heap)
            rec = self._records.get(name)
            if rec is None or rec.grant is not grant or self._counted[name] not in _EXPIRING:
                continue  # an entry for a grant that was replaced since
            self._counts[self._counted[name]] -= 1
            self._counted[name] = CredentialState.EXPIRED
            self._counts[CredentialState.EXPIRED] += 1
        return dict(self._counts)

    def _uncount(self, name: str) -> CredentialState | None:
        state = self._counted.pop(name, None)
        if state is not None:
            self._counts[state] -= 1
        return state

    def _recount(self, now: float) -> None:
        """Counts and heap rebuilt from the records (a clock that went back; a heap grown
        with the entries of replaced grants)."""
        self._now = now
        self._counts = dict.fromkeys(CredentialState, 0)
        self._counted = {}
        self._expiries = []
        for name, rec in self._records.items():
            state = self._counted[name] = rec.state(now)
            self._counts[state] += 1
            if state in _EXPIRING and rec.grant is not None:
                self._expiries.append((rec.grant.expires_at, next(self._seq), name, rec.grant))
        heapq.heapify(self._expiries)
