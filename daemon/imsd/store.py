"""The token store: what the daemon currently knows about each credential.

One :class:`Entry` per credential name holds the credential in force (the last good version
when its file is broken), the current grant, and the failure bookkeeping that the scheduler,
the status API and the metrics read. The store is plain data mutated by the supervisor only;
readers take :meth:`TokenStore.snapshot` copies. It does no I/O.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from imsd.model import Credential, CredentialState, Grant
from imsd.schedule import token_state

__all__ = ["Entry", "TokenStore"]


@dataclass(slots=True)
class Entry:
    name: str
    path: Path
    credential: Credential | None = None  # None: the file never parsed
    grant: Grant | None = None
    consecutive_failures: int = 0
    last_refresh: float | None = None  # wall-clock time of the last successful refresh
    last_error: str | None = None  # last refresh or write error (safe to show)
    file_error: str | None = None  # the credential file is currently broken
    # Some output files of the current token could not be rendered safely (see last_error):
    # the token is served but the credential is not healthy, so its state says "stale".
    outputs_incomplete: bool = False

    def state(self, now: float) -> CredentialState:
        if self.credential is None:
            return CredentialState.INVALID
        failing = self.consecutive_failures > 0 or self.outputs_incomplete
        return token_state(self.grant, now, failing=failing)

    def error(self) -> str | None:
        """The most relevant error to show: a broken file wins over a failed refresh."""
        return self.file_error or self.last_error


class TokenStore:
    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str) -> Entry | None:
        return self._entries.get(name)

    def upsert(self, name: str, path: Path) -> Entry:
        entry = self._entries.get(name)
        if entry is None:
            entry = self._entries[name] = Entry(name, path)
        entry.path = path
        return entry

    def remove(self, name: str) -> Entry | None:
        return self._entries.pop(name, None)

    def snapshot(self) -> list[Entry]:
        return [replace(e) for e in sorted(self._entries.values(), key=lambda e: e.name)]

    def counts(self, now: float) -> dict[CredentialState, int]:
        out = dict.fromkeys(CredentialState, 0)
        for entry in self._entries.values():
            out[entry.state(now)] += 1
        return out
