"""Connection slots (:mod:`imsd.slots`): which connection is shed, which has timed out. Pure,
table-tested; the servers that hold them are tested over real sockets in test_httpserver.py
and test_proxy.py."""

from __future__ import annotations

import math

import pytest
from imsd.slots import SlotTable

# Each step: (op, key, now, seconds); the table's idlest and expired(now) after the steps.
Step = tuple[str, str, float, float]


@pytest.mark.parametrize(
    ("steps", "idlest", "expired_at", "expired"),
    [
        # Every connection busy (new, or waiting on a handler or upstream): none to shed.
        ([("add", "a", 0, 0), ("add", "b", 0, 0)], None, 1e9, []),
        # The one idle the longest, whatever the order they came in.
        (
            [("add", "a", 0, 0), ("add", "b", 0, 0), ("idle", "b", 1, 30), ("idle", "a", 2, 30)],
            "b",
            31.5,
            ["b"],
        ),
        # A client being answered now (a short take deadline) is not shed before an attacker
        # idle for 20 s (a longer head deadline): since, not the deadline, decides.
        (
            [
                ("add", "att", 0, 0),
                ("idle", "att", 0, 30),
                ("add", "c", 20, 0),
                ("idle", "c", 20, 5),
            ],
            "att",
            26,
            ["c"],
        ),
        # Busy again: out of reach of both the sweeper and the shedding.
        (
            [("add", "a", 0, 0), ("idle", "a", 0, 1), ("busy", "a", 0.5, 0), ("add", "b", 1, 0)],
            None,
            100,
            [],
        ),
        # Idle again: its wait starts over (a body arriving piece by piece).
        (
            [
                ("add", "a", 0, 0),
                ("idle", "a", 0, 10),
                ("add", "b", 5, 0),
                ("idle", "b", 5, 10),
                ("idle", "a", 8, 10),
            ],
            "b",
            16,
            ["b"],
        ),
        # Gone: a removed connection is neither shed nor swept, and marking it does nothing.
        (
            [("add", "a", 0, 0), ("idle", "a", 0, 1), ("remove", "a", 1, 0), ("idle", "a", 2, 1)],
            None,
            100,
            [],
        ),
    ],
)
def test_slot_table(
    steps: list[Step], idlest: str | None, expired_at: float, expired: list[str]
) -> None:
    t: SlotTable[str] = SlotTable(capacity=8)
    for op, key, now, seconds in steps:
        if op == "add":
            t.add(key)
        elif op == "idle":
            t.idle(key, now, seconds)
        elif op == "busy":
            t.busy(key)
        else:
            t.remove(key)
    assert t.idlest() == idlest
    assert t.expired(expired_at) == expired


def test_shedding_frees_the_slot_at_once() -> None:
    t: SlotTable[str] = SlotTable(capacity=2)
    t.add("a")
    t.add("b")
    assert t.full
    assert t.shed() is None  # both busy: the newcomer is refused
    t.idle("b", 1.0, 10.0)
    assert t.shed() == "b"
    assert not t.full
    assert "b" not in t
    assert len(t) == 1
    t.remove("b")  # its task ends later: nothing left to remove
    assert len(t) == 1
    t.capacity = 1  # a reload lowers the cap
    assert t.full
    assert t.expired(math.inf) == []  # busy connections never expire
