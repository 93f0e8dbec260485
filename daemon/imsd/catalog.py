"""The credential catalog: successive directory scans in, add/change/remove events out.

Theory of operation
-------------------
A scan maps every candidate file to what parsing it gave: a list of credentials (one for a
native file, one or more for a Developer Console project) or a :class:`CredentialError`. The
catalog remembers, per file, the last list that parsed, and compares the wanted set of
credentials (by name) with the current one by content digest:

- a new name → :class:`Added`; a different digest → :class:`Changed`; a name gone →
  :class:`Removed`;
- a file that stops parsing keeps its last good credentials running: :class:`Failed` carries
  the error and the credential kept (``None`` if the file never parsed);
- a file whose error goes away (fixed or deleted) → :class:`Resolved`;
- two files defining one name: the first path in sort order wins, the other is Failed.

It is pure: applying the same scan twice yields no events, and errors are re-reported only
when they change, so a periodic re-scan is silent.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from imsd.model import Credential, CredentialError

__all__ = [
    "Added",
    "Catalog",
    "Changed",
    "Event",
    "Failed",
    "Removed",
    "Resolved",
    "ScanResult",
]

ScanResult = Sequence[Credential] | CredentialError


@dataclass(frozen=True, slots=True)
class Added:
    cred: Credential


@dataclass(frozen=True, slots=True)
class Changed:
    old: Credential
    new: Credential


@dataclass(frozen=True, slots=True)
class Removed:
    cred: Credential


@dataclass(frozen=True, slots=True)
class Failed:
    path: Path
    name: str | None  # the credential the error concerns, when known
    error: CredentialError
    kept: Credential | None = None  # the last good version still in use


@dataclass(frozen=True, slots=True)
class Resolved:
    path: Path  # the file's earlier error no longer applies


Event = Added | Changed | Removed | Failed | Resolved


class Catalog:
    def __init__(self) -> None:
        self.credentials: dict[str, Credential] = {}
        self.errors: dict[Path, CredentialError] = {}
        self._good: dict[Path, tuple[Credential, ...]] = {}

    def apply(self, scan: Mapping[Path, ScanResult]) -> list[Event]:
        events: list[Event] = []
        errors: dict[Path, CredentialError] = {}
        good: dict[Path, tuple[Credential, ...]] = {}
        for path in sorted(scan, key=os.fspath):  # str keys: Path.__lt__ is slow at 10k
            result = scan[path]
            if isinstance(result, CredentialError):
                errors[path] = result
                if path in self._good:
                    good[path] = self._good[path]  # keep the last good version running
            else:
                good[path] = tuple(result)

        wanted: dict[str, Credential] = {}
        for path in sorted(good, key=os.fspath):
            for cred in good[path]:
                first = wanted.get(cred.name)
                if first is not None and first.path != cred.path:
                    errors.setdefault(
                        path,
                        CredentialError(
                            path,
                            f"duplicate name {cred.name!r}, also defined in {first.path}",
                            field="name",
                        ),
                    )
                    continue
                wanted[cred.name] = cred

        for name, cred in self.credentials.items():
            if name not in wanted:
                events.append(Removed(cred))
        for name, cred in wanted.items():
            old = self.credentials.get(name)
            if old is None:
                events.append(Added(cred))
            elif old.digest != cred.digest or (old.path in self.errors and old.path not in errors):
                events.append(Changed(old, cred))

        for path, error in errors.items():
            previous = self.errors.get(path)
            if previous is not None and str(previous) == str(error):
                continue
            kept = [c for c in good.get(path, ()) if wanted.get(c.name) is c]
            if kept:
                events.extend(Failed(path, c.name, error, c) for c in kept)
            else:
                events.append(Failed(path, None, error))
        events.extend(Resolved(path) for path in self.errors if path not in errors)

        self.credentials, self.errors, self._good = wanted, errors, good
        return events
