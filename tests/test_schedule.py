from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from imsd.model import CredentialState, Grant, ImsError, ImsErrorKind, Secret
from imsd.schedule import (
    MIN_WAIT,
    WRITE_RETRY_CAP,
    ClockWatch,
    RateLimiter,
    RefreshPolicy,
    backoff_delay,
    next_refresh_at,
    retry_at,
    token_state,
    write_retry_at,
)

P = RefreshPolicy()
DAY = 86400.0


def grant(issued: float = 1000.0, life: float = DAY) -> Grant:
    return Grant(Secret("t"), "bearer", issued, issued + life)


@pytest.mark.parametrize(
    ("life", "rand", "expected"),
    [
        (DAY, 0.0, 1000 + 0.8 * DAY),  # no jitter drawn
        (DAY, 0.999999, 1000 + 0.8 * DAY - 0.999999 * 0.05 * DAY),
        (1800.0, 0.0, 1000 + 1200.0),  # 0.8 × 30 min = 24 min > expires − 10 min = 20 min
        (600.0, 0.0, 1000 + 300.0),  # margin ≥ lifetime: half the lifetime
        (0.0, 0.5, 1000.0),
    ],
)
def test_next_refresh_table(life: float, rand: float, expected: float) -> None:
    assert next_refresh_at(grant(life=life), P, rand) == pytest.approx(expected)


@given(
    issued=st.floats(0, 2e9),
    life=st.floats(1, 10 * DAY),
    rand=st.floats(0, 1, exclude_max=True),
)
def test_next_refresh_invariants(issued: float, life: float, rand: float) -> None:
    g = grant(issued, life)
    at = next_refresh_at(g, P, rand)
    assert g.issued_at <= at < g.expires_at
    if life > P.min_margin:
        assert at <= g.expires_at - P.min_margin + 1e-6


@pytest.mark.parametrize(
    ("attempt", "rand", "expected"),
    [
        (1, 0.5, 0.5),
        (2, 0.5, 1.0),
        (4, 1.0, 8.0),
        (10, 1.0, 300.0),
        (10**6, 1.0, 300.0),
        (1, 0.0, MIN_WAIT),
    ],
)
def test_backoff_table(attempt: int, rand: float, expected: float) -> None:
    assert backoff_delay(attempt, P, rand) == expected


@given(st.integers(1, 10**9), st.floats(0, 1, exclude_max=True))
def test_backoff_bounded(attempt: int, rand: float) -> None:
    assert MIN_WAIT <= backoff_delay(attempt, P, rand) <= P.backoff_cap


@pytest.mark.parametrize(
    ("attempt", "rand", "expires_at", "expected"),
    [
        (1, 0.5, 1e9, 1000.5),  # the IMS backoff while it is short
        (3, 1.0, 1e9, 1004.0),
        (4, 1.0, 1e9, 1000 + WRITE_RETRY_CAP),  # 8 s: capped (the IMS cap is 300 s)
        (10**6, 0.999, 1e9, 1000 + 0.999 * WRITE_RETRY_CAP),
        (10**6, 1.0, 1002.0, 1002.0),  # never after the token expires
        (10**6, 1.0, 1000.01, 1000 + MIN_WAIT),  # … nor spinning
        (10**6, 1.0, 900.0, 1000 + WRITE_RETRY_CAP),  # expired: still retried, capped
        (1, 0.0, 1e9, 1000 + MIN_WAIT),
    ],
)
def test_write_retry_table(attempt: int, rand: float, expires_at: float, expected: float) -> None:
    assert write_retry_at(1000.0, attempt, P, rand, expires_at) == pytest.approx(expected)


@given(
    st.floats(0, 1e9),
    st.integers(1, 10**9),
    st.floats(0, 1),
    st.floats(0, 2e9),
    st.floats(0.001, 1e4),
    st.floats(0.001, 1e4),
)
def test_write_retry_is_short_and_within_the_token_life(
    now: float, attempt: int, rand: float, expires_at: float, initial: float, cap: float
) -> None:
    policy = RefreshPolicy(backoff_initial=initial, backoff_cap=cap)
    wake = write_retry_at(now, attempt, policy, rand, expires_at)
    assert now + MIN_WAIT * 0.999 <= wake <= now + max(MIN_WAIT, WRITE_RETRY_CAP) + 1e-6
    if expires_at > now + MIN_WAIT:
        assert wake <= expires_at


def test_retry_after_is_honoured() -> None:
    e = ImsError(ImsErrorKind.THROTTLED, "too_many_requests", status=429, retry_after=42)
    assert retry_at(100.0, e, 1, P, 0.9, None) == 142.0


def throttled(retry_after: float | None) -> ImsError:
    return ImsError(
        ImsErrorKind.THROTTLED, "too_many_requests", status=429, retry_after=retry_after
    )


YEAR = 365 * DAY


@pytest.mark.parametrize(
    ("retry_after", "expires_at", "expected"),
    [
        (42.0, None, 142.0),  # honoured
        (10 * YEAR, None, 100.0 + P.backoff_cap),  # capped at the backoff cap
        (float("inf"), None, 100.0 + P.backoff_cap),  # a 400-digit header parses as inf
        (0.0, None, 100.0 + MIN_WAIT),
        (-5.0, None, 100.0 + MIN_WAIT),
        (float("nan"), None, 100.0 + 0.5),  # ignored: plain backoff (attempt 1, rand 0.5)
        # A valid token: honoured while the token stays valid, margin or not (issue 23) …
        (10 * YEAR, 100.0 + 700.0, 100.0 + P.backoff_cap),
        (200.0, 100.0 + 700.0, 100.0 + 200.0),
        (50.0, 100.0 + 700.0, 150.0),
        (10 * YEAR, 100.0 + 500.0, 100.0 + P.backoff_cap),
        # … and just before expiry at the latest.
        (10 * YEAR, 100.0 + 120.0, 100.0 + 119.0),
        (200.0, 100.0 + 150.0, 100.0 + 149.0),
        # An expired token does not bound anything.
        (10 * YEAR, 50.0, 100.0 + P.backoff_cap),
    ],
)
def test_retry_after_table(retry_after: float, expires_at: float | None, expected: float) -> None:
    assert retry_at(100.0, throttled(retry_after), 1, P, 0.5, expires_at) == pytest.approx(expected)


@given(
    now=st.floats(0, 2e9),
    retry_after=st.floats(allow_nan=True, allow_infinity=True),
    left=st.one_of(st.none(), st.floats(-DAY, 30 * DAY)),
    attempt=st.integers(1, 100),
    rand=st.floats(0, 1, exclude_max=True),
)
def test_retry_after_is_bounded(
    now: float, retry_after: float, left: float | None, attempt: int, rand: float
) -> None:
    """Whatever Retry-After IMS sends, the retry comes within the backoff cap, and not
    before it unless the served token would expire first: then just before that."""
    expires = None if left is None else now + left
    wake = retry_at(now, throttled(retry_after), attempt, P, rand, expires)
    assert now < wake <= now + P.backoff_cap + 1e-6
    if retry_after == retry_after:  # not NaN (a plugin's error: plain backoff)
        honoured = now + min(P.backoff_cap, max(MIN_WAIT, retry_after))
        window = min(P.backoff_initial, 1.0)
        if expires is None or expires - window <= now or honoured <= expires - window:
            assert wake == pytest.approx(honoured, abs=1e-6)
        else:
            assert wake == pytest.approx(expires - window, abs=1e-6)


@pytest.mark.parametrize(
    ("left", "retry_after", "margin", "expected"),
    [
        # Issue 23: 21 s left, Retry-After 5: retried after 1.5 s (expires − min_margin).
        (21.0, 5.0, 19.5, 5.0),
        (21.0, 5.0, 600.0, 5.0),
        (21.0, 5.0, 0.0, 5.0),
        (21.0, 30.0, 19.5, 20.0),  # past the expiry: its last second instead
        (6.0, 5.0, 19.5, 5.0),  # the last moment that leaves the request its second
        (6.0, 5.0, 0.0, 5.0),
        (5.5, 5.0, 19.5, 4.5),  # the last chance: 1 s before expiry
        (5.9, 5.0, 600.0, 4.9),
        (6.0, 5.5, 600.0, 5.0),
        (0.5, 5.0, 600.0, 5.0),  # inside the last window: honoured (no retry storm)
        (3600.0, 5.0, 3599.0, 5.0),
    ],
)
def test_retry_after_is_honoured_while_the_token_stays_valid(
    left: float, retry_after: float, margin: float, expected: float
) -> None:
    policy = RefreshPolicy(min_margin=margin)
    wake = retry_at(1000.0, throttled(retry_after), 1, policy, 0.5, 1000.0 + left)
    assert wake - 1000.0 == pytest.approx(expected)


def test_permanent_waits_the_cap() -> None:
    e = ImsError(ImsErrorKind.PERMANENT, "invalid_client", status=401)
    assert retry_at(100.0, e, 1, P, 0.1, 150.0) == 100.0 + P.backoff_cap


@given(
    now=st.floats(0, 1e9),
    left=st.floats(0.1, DAY),
    attempt=st.integers(1, 100),
    rand=st.floats(0, 1, exclude_max=True),
    kind=st.sampled_from([ImsErrorKind.TRANSIENT, ImsErrorKind.THROTTLED]),
    retry_after=st.one_of(st.none(), st.floats(0, 10 * DAY)),
)
def test_retry_never_past_expiry(
    now: float,
    left: float,
    attempt: int,
    rand: float,
    kind: ImsErrorKind,
    retry_after: float | None,
) -> None:
    e = ImsError(kind, "x", retry_after=retry_after)
    wake = retry_at(now, e, attempt, P, rand, now + left)
    window = min(P.backoff_initial, 1.0)
    assert wake >= now + MIN_WAIT - 1e-6
    if left > window:  # the last chance, before the token expires
        assert wake <= now + left - window + 1e-6
    elif retry_after is not None and kind is ImsErrorKind.THROTTLED:
        # Inside the last window IMS's Retry-After is honoured: no retry every MIN_WAIT.
        assert wake >= now + min(P.backoff_cap, max(MIN_WAIT, retry_after)) - 1e-6


def test_the_last_second_is_not_a_retry_storm() -> None:
    """A 429 with Retry-After 30 in a token's last second used to be retried every 50 ms."""
    e = ImsError(ImsErrorKind.THROTTLED, "too_many_requests", retry_after=30.0)
    expires, now, attempts = 1000.0, 999.0, 0
    while now < expires:
        now = retry_at(now, e, attempts + 1, P, 0.5, expires)
        attempts += 1
    assert attempts == 1


@pytest.mark.parametrize(
    ("wall", "mono", "expected"),
    [
        ((1000.0, 1030.0), (5.0, 35.0), None),  # both moved 30 s
        ((1000.0, 1030.4), (5.0, 35.0), None),  # NTP slew, within tolerance
        ((1000.0, 4630.0), (5.0, 35.0), 3600.0),  # stepped forward an hour
        ((1000.0, 1000.0 - 3570.0), (5.0, 35.0), -3600.0),  # stepped back an hour
        ((1000.0, 8230.0), (5.0, 35.0), 7200.0),  # suspended 2 h: monotonic stood still
    ],
)
def test_clock_watch(
    wall: tuple[float, float], mono: tuple[float, float], expected: float | None
) -> None:
    watch = ClockWatch(wall[0], mono[0])
    drift = watch.jumped(wall[1], mono[1])
    assert drift == (None if expected is None else pytest.approx(expected))
    # the next check starts from the new readings: no jump reported twice
    assert watch.jumped(wall[1] + 30, mono[1] + 30) is None


def test_clock_watch_adds_up_small_drifts() -> None:
    watch = ClockWatch(1000.0, 5.0)
    wall, mono = 1000.0, 5.0
    reported = []
    for _ in range(10):  # 0.3 s of drift per 30 s check: each alone within tolerance
        wall, mono = wall + 30.3, mono + 30.0
        reported.append(watch.jumped(wall, mono))
    assert reported[:3] == [None, None, None]
    assert reported[3] == pytest.approx(1.2)
    assert reported[4:7] == [None, None, None]


def test_token_states() -> None:
    g = grant(issued=0, life=100)
    assert token_state(None, 0, failing=False) is CredentialState.PENDING
    assert token_state(None, 0, failing=True) is CredentialState.EXPIRED
    assert token_state(g, 50, failing=False) is CredentialState.VALID
    assert token_state(g, 50, failing=True) is CredentialState.STALE
    assert token_state(g, 100, failing=True) is CredentialState.EXPIRED


def test_rate_limiter_books_future_slots() -> None:
    rl = RateLimiter(rate=2.0, burst=2)
    assert [rl.reserve(0.0) for _ in range(4)] == [0.0, 0.0, 0.5, 1.0]
    assert rl.reserve(10.0) == 0.0
    assert RateLimiter(None).reserve(0.0) == 0.0
    with pytest.raises(ValueError, match="positive"):
        RateLimiter(0)


def test_rate_limiter_as_a_byte_rate() -> None:
    """Each reservation costs its size: /metrics answers share one byte rate (issue 23)."""
    rl = RateLimiter(rate=1000.0, burst=2000)
    assert rl.reserve(0.0, 1500) == 0.0  # within the burst
    assert rl.reserve(0.0, 500) == 0.0
    assert rl.reserve(0.0, 250) == 0.25  # booked behind it, in order
    assert rl.reserve(0.0, 250) == 0.5
    assert rl.reserve(10.0, 2000) == 0.0  # refilled up to the burst, no further
    assert rl.reserve(10.0, 1000) == 1.0


@given(st.lists(st.floats(0, 0.01), min_size=1, max_size=200))
def test_rate_limiter_never_exceeds_rate(gaps: list[float]) -> None:
    rl = RateLimiter(rate=10.0, burst=3)
    now, starts = 0.0, []
    for gap in gaps:
        now += gap
        starts.append(now + rl.reserve(now))
    # Over any run of requests, the span covers (n - burst) / rate seconds.
    starts.sort()
    for i in range(len(starts)):
        for j in range(i + 3, len(starts)):
            assert starts[j] - starts[i] >= (j - i - 3 + 1) / 10.0 - 1e-9
