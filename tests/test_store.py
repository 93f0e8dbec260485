"""The store's counts, kept as records come and go, against a walk over every record."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from imsd.model import CredentialState, Grant, Secret
from imsd.scheduler import Record
from imsd.store import TokenStore

NAMES = ["a", "b", "c"]
GRANTS = [
    Grant(Secret(f"t{i}"), "bearer", issued_at=0.0, expires_at=float(at))
    for i, at in enumerate((5, 10, 10, 20, 40))
]
CRED = object()  # Record.state only asks whether there is a credential

records = st.builds(
    lambda name, grant, cred, failures: Record(
        name,
        Path(name),
        credential=CRED if cred else None,  # type: ignore[arg-type]
        grant=grant,
        consecutive_failures=failures,
    ),
    st.sampled_from(NAMES),
    st.none() | st.sampled_from(GRANTS),
    st.booleans(),
    st.integers(0, 1),
)
steps = st.one_of(
    st.tuples(st.just("put"), records),
    st.tuples(st.just("remove"), st.sampled_from(NAMES)),
    st.tuples(st.just("counts"), st.floats(0, 50, allow_nan=False)),
)


def walked(store: TokenStore, now: float) -> dict[CredentialState, int]:
    out = dict.fromkeys(CredentialState, 0)
    for rec in store:
        out[rec.state(now)] += 1
    return out


@settings(max_examples=300)
@given(st.lists(steps, max_size=40), st.floats(0, 50, allow_nan=False))
def test_counts_match_a_walk_whatever_the_order(ops: list[tuple[str, object]], end: float) -> None:
    store = TokenStore()
    for op, arg in ops:
        if op == "put":
            assert isinstance(arg, Record)
            store.put(arg)
        elif op == "remove":
            assert isinstance(arg, str)
            store.remove(arg)
        else:
            assert isinstance(arg, float)
            assert store.counts(arg) == walked(store, arg)  # time also goes back here
    assert store.counts(end) == walked(store, end)


def test_a_token_expires_in_the_counts_without_a_put() -> None:
    store = TokenStore()
    store.put(Record("a", Path("a"), credential=CRED, grant=GRANTS[0]))  # type: ignore[arg-type]
    assert store.counts(4.0)[CredentialState.VALID] == 1
    assert store.counts(5.0)[CredentialState.EXPIRED] == 1


def test_replaced_grants_do_not_pile_up() -> None:
    store = TokenStore()
    for i in range(1000):  # a credential refreshed (forced) over and over within a lifetime
        grant = Grant(Secret("t"), "bearer", issued_at=0.0, expires_at=1e9 + i)
        store.put(Record("a", Path("a"), credential=CRED, grant=grant))  # type: ignore[arg-type]
    assert len(store._expiries) <= 2 * len(store) + 64
    assert store.counts(0.0)[CredentialState.VALID] == 1
