"""The refresh rule, as pure functions of wall-clock times (Unix seconds) and random draws.

Theory of operation
-------------------
After a success the next refresh is due at ``issued + fraction × lifetime``, pulled earlier
by up to ``jitter × lifetime`` (so that credentials minted together spread out) and never
later than ``expires − min_margin``. For a token so short-lived that the margin would put the
refresh before it was issued, the margin gives way to half the lifetime.

After a failure the wait is exponential backoff with full jitter (AWS-style: a uniform draw
in ``[0, min(cap, initial × 2^(attempt−1))]``), a ``Retry-After`` when IMS sent one (at most
the cap), the cap for permanent errors (a human must fix the file; its change wakes the
worker at once), and never past the last moment of the current token while that token is
still good: just before its expiry.

Workers sleep on the monotonic clock until their wall-clock time is due. One
:class:`ClockWatch` per daemon compares, every re-check interval, how far the wall clock and
the monotonic clock moved: a jump (an NTP step, a suspended laptop, whose monotonic clock
stood still) wakes every worker to look again, so it is noticed within that interval.
Watching the clock thus costs one wake-up per interval, whatever the number of credentials.
The random draws are arguments, so every function here is deterministic under test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from imsd.model import CredentialState, Grant, ImsError, ImsErrorKind

__all__ = [
    "ClockWatch",
    "RateLimiter",
    "RefreshPolicy",
    "backoff_delay",
    "next_refresh_at",
    "retry_at",
    "token_state",
    "write_retry_at",
]

#: Shortest wait between attempts, so a zero draw or a zero Retry-After never spins.
MIN_WAIT = 0.05
#: Longest wait before retrying a failed write of the output files. A write retry costs IMS
#: nothing (only local I/O), so once space returns the files follow within seconds.
WRITE_RETRY_CAP = 5.0


@dataclass(frozen=True, slots=True)
class RefreshPolicy:
    refresh_fraction: float = 0.8
    jitter_fraction: float = 0.05
    min_margin: float = 600.0
    backoff_initial: float = 1.0
    backoff_cap: float = 300.0
    recheck_interval: float = 30.0


def next_refresh_at(grant: Grant, policy: RefreshPolicy, rand: float) -> float:
    """When to refresh a token obtained successfully; *rand* is a draw in [0, 1)."""
    life = max(grant.lifetime, 0.0)
    due = grant.issued_at + policy.refresh_fraction * life - rand * policy.jitter_fraction * life
    latest = grant.expires_at - policy.min_margin
    if latest <= grant.issued_at:  # the margin is longer than the token lives
        latest = grant.issued_at + life / 2
    return max(grant.issued_at, min(due, latest))


def backoff_delay(attempt: int, policy: RefreshPolicy, rand: float) -> float:
    """Full-jitter exponential backoff for the *attempt*-th consecutive failure (1-based)."""
    exponent = min(max(attempt, 1) - 1, 62)  # 2**62 × initial exceeds any sane cap
    ceiling = min(policy.backoff_cap, policy.backoff_initial * math.ldexp(1.0, exponent))
    return max(MIN_WAIT, rand * ceiling)


def retry_at(
    now: float,
    error: ImsError,
    attempt: int,
    policy: RefreshPolicy,
    rand: float,
    expires_at: float | None,
) -> float:
    """When to try again after *error*.

    A ``Retry-After`` is honoured (it is IMS telling us when it will answer) up to the
    backoff cap: one answer must not park a credential for years. The refresh margin does
    not shorten it: the token being served is still good until it expires, and asking
    before IMS said to only earns another 429. When a wait would run past the expiry of that
    token, the retry moves to just before the expiry instead (``min(backoff_initial, 1 s)``
    before it), the last chance to keep a valid token; once inside that last window, waits
    are not shortened again.
    """
    retry_after = error.retry_after if error.kind is ImsErrorKind.THROTTLED else None
    if retry_after is not None and math.isnan(retry_after):  # a plugin's ImsError: ignore it
        retry_after = None
    if error.kind is ImsErrorKind.PERMANENT:
        wait = policy.backoff_cap
    elif retry_after is not None:
        wait = min(policy.backoff_cap, max(MIN_WAIT, retry_after))
    else:
        wait = backoff_delay(attempt, policy, rand)
    wake = now + wait
    # The last chance is taken once: inside its window the ordinary wait (and Retry-After)
    # applies, so a failing IMS is not asked every MIN_WAIT in the token's last second.
    window = min(policy.backoff_initial, 1.0)
    if (
        expires_at is not None
        and now < expires_at - window
        and error.kind is not ImsErrorKind.PERMANENT
    ):
        wake = min(wake, expires_at - window)
    return wake


def write_retry_at(
    now: float, attempt: int, policy: RefreshPolicy, rand: float, expires_at: float
) -> float:
    """When to retry the *attempt*-th consecutive failed write of a token expiring at
    *expires_at*: full-jitter backoff capped at :data:`WRITE_RETRY_CAP` (not the IMS backoff
    cap), and never after the token expires (past that the files are worthless anyway)."""
    exponent = min(max(attempt, 1) - 1, 62)
    ceiling = min(
        WRITE_RETRY_CAP, policy.backoff_cap, policy.backoff_initial * math.ldexp(1.0, exponent)
    )
    wake = now + max(MIN_WAIT, rand * ceiling)
    if expires_at > now:
        wake = min(wake, max(now + MIN_WAIT, expires_at))
    return wake


class ClockWatch:
    """Notices wall-clock jumps: feed it both clocks at each check; :meth:`jumped` returns
    how far the wall clock moved beyond (or short of) the monotonic clock since the last
    reported jump, or None while it kept pace within *tolerance* seconds. Measured from the
    last report, not the last check, so small drifts cannot add up unnoticed."""

    def __init__(self, wall: float, mono: float, tolerance: float = 1.0) -> None:
        self._wall, self._mono = wall, mono
        self.tolerance = tolerance

    def jumped(self, wall: float, mono: float) -> float | None:
        drift = (wall - self._wall) - (mono - self._mono)
        if abs(drift) <= self.tolerance:
            return None
        self._wall, self._mono = wall, mono
        return drift


def token_state(grant: Grant | None, now: float, *, failing: bool) -> CredentialState:
    if grant is None:
        return CredentialState.EXPIRED if failing else CredentialState.PENDING
    if now >= grant.expires_at:
        return CredentialState.EXPIRED
    return CredentialState.STALE if failing else CredentialState.VALID


class RateLimiter:
    """A token bucket (pure: the caller passes the time and sleeps the returned delay).

    ``reserve`` books the next slot even when it lies in the future, so concurrent callers
    queue up in order instead of all waking at once.
    """

    def __init__(self, rate: float | None, burst: int = 1) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive (or None for no limit)")
        self.rate = rate
        self.burst = max(1, burst)
        self._tokens = float(self.burst)
        self._stamp: float | None = None

    def reserve(self, now: float, cost: float = 1.0) -> float:
        """Take *cost* tokens (a request; or bytes, for a byte rate); the delay to wait first."""
        if self.rate is None:
            return 0.0
        if self._stamp is None:
            self._stamp = now
        elapsed = max(0.0, now - self._stamp)
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
        self._stamp = max(self._stamp, now)
        self._tokens -= cost
        if self._tokens >= 0:
            return 0.0
        return -self._tokens / self.rate
