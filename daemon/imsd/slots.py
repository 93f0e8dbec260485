"""Connection slots: which connections a server holds, which of them wait on their peer
(and since when, and until when), and so which one to shed or time out. Pure: the caller
passes the time; :class:`imsd.httpserver.Slots` is the anyio driver around it.

A connection is *busy* while it waits on the server's own work (a handler, an upstream):
it neither times out nor is shed. It is *idle* while it waits on its peer (its next
request, the rest of a head or body, the peer taking what was sent): it is cancelled at its
deadline, and may be shed before that for a newcomer when every slot is taken. The one shed
is the one idle the longest (the earliest ``since``), never the one with the earliest
deadline: deadlines differ by phase (a head may take longer than a write), and a client
being answered right now must not go before an attacker's connection idle for many seconds.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["SlotTable"]

K = TypeVar("K", bound=Hashable)


@dataclass(slots=True)
class _Slot:
    since: float  # when it began waiting on its peer; inf while busy
    deadline: float  # by when it must have moved on; inf while busy


class SlotTable(Generic[K]):
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._slots: dict[K, _Slot] = {}

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: object) -> bool:
        return key in self._slots

    @property
    def full(self) -> bool:
        return len(self._slots) >= self.capacity

    def add(self, key: K) -> None:
        """A new connection, busy (it has not begun to wait on its peer)."""
        self._slots[key] = _Slot(math.inf, math.inf)

    def remove(self, key: K) -> None:
        self._slots.pop(key, None)  # already gone if it was shed

    def idle(self, key: K, now: float, seconds: float) -> None:
        """*key* waits on its peer from *now*, for at most *seconds*."""
        slot = self._slots.get(key)
        if slot is not None:  # not once shed
            slot.since, slot.deadline = now, now + seconds

    def busy(self, key: K) -> None:
        slot = self._slots.get(key)
        if slot is not None:
            slot.since = slot.deadline = math.inf

    def idlest(self) -> K | None:
        """The connection waiting on its peer the longest; None when every one is busy."""
        best: K | None = None
        since = math.inf
        for key, slot in self._slots.items():
            if slot.since < since:
                best, since = key, slot.since
        return best

    def shed(self) -> K | None:
        """Take the idlest connection out (its slot is free at once); None if none is idle."""
        key = self.idlest()
        if key is not None:
            del self._slots[key]
        return key

    def expired(self, now: float) -> list[K]:
        """The connections past their deadline (they stay until their task removes them)."""
        return [key for key, slot in self._slots.items() if now > slot.deadline]
