"""The token store: the current :class:`~imsd.scheduler.Record` of every credential.

Readers (the socket API, metrics, health, the daemon's status line) get frozen records: they
cannot change what they read, and a record they hold stays consistent while the supervisor
installs newer ones. Only :mod:`imsd.supervisor` calls :meth:`TokenStore.put` and
:meth:`TokenStore.remove`. It does no I/O.
"""

from __future__ import annotations

from collections.abc import Iterator

from imsd.model import CredentialState
from imsd.scheduler import Record

__all__ = ["Entry", "TokenStore"]

#: What readers see of a credential (the scheduler's record, read-only).
Entry = Record


class TokenStore:
    def __init__(self) -> None:
        self._records: dict[str, Record] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._records

    def __iter__(self) -> Iterator[Record]:
        return iter(list(self._records.values()))

    def __len__(self) -> int:
        return len(self._records)

    def get(self, name: str) -> Record | None:
        return self._records.get(name)

    def put(self, record: Record) -> None:
        self._records[record.name] = record

    def remove(self, name: str) -> Record | None:
        return self._records.pop(name, None)

    def snapshot(self) -> list[Record]:
        return sorted(self._records.values(), key=lambda r: r.name)

    def counts(self, now: float) -> dict[CredentialState, int]:
        out = dict.fromkeys(CredentialState, 0)
        for record in self._records.values():
            out[record.state(now)] += 1
        return out
