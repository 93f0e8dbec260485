"""The pure transitions of imsd.scheduler: tables for each event, hypothesis for the
invariants (a failure never drops a token; a token is installed only for the identity it was
asked for; a rotated refresh token is saved before it is published; waits stay in bounds)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from imsd import scheduler
from imsd.model import Credential, CredentialState, Grant, ImsError, ImsErrorKind, Secret
from imsd.schedule import MIN_WAIT, RefreshPolicy
from imsd.scheduler import Fetch, Notify, Record, RunAction, Save, Write

P = RefreshPolicy()
DAY = 86400.0
NOW = 1_000_000.0


def cred(secret: str = "s1", **change: object) -> Credential:
    base = Credential(
        name="alpha",
        path=Path("/c/alpha.toml"),
        auth="oauth_server_to_server",
        client_id="cid",
        client_secret=Secret(secret),
        org_id="0123456789ABCDEF01234567@AdobeOrg",
        scopes=("openid",),
    )
    return replace(base, **change)  # type: ignore[arg-type]


def grant(issued: float = NOW, life: float = DAY, rt: str | None = None) -> Grant:
    return Grant(
        Secret(f"tok-{issued}"),
        "bearer",
        issued,
        issued + life,
        Secret(rt) if rt is not None else None,
    )


def fetched(c: Credential | None = None, g: Grant | None = None) -> Record:
    """A record that holds a token for *c* (written, announced)."""
    c = c or cred()
    g = g or grant()
    rec, _ = scheduler.added("alpha", c.path, c, NOW)
    rec = scheduler.fetch_started(rec, NOW)
    rec, _ = scheduler.fetch_succeeded(rec, c.identity, g, NOW, P, 0.5)
    rec, _ = scheduler.write_succeeded(rec, g, NOW)
    return rec


TRANSIENT = ImsError(ImsErrorKind.TRANSIENT, "http_503", status=503)
PERMANENT = ImsError(ImsErrorKind.PERMANENT, "invalid_client", status=401)


def throttled(after: float | None) -> ImsError:
    return ImsError(ImsErrorKind.THROTTLED, "too_many_requests", status=429, retry_after=after)


# -- tables ---------------------------------------------------------------------------------


def test_added_fetches_now() -> None:
    rec, effects = scheduler.added("alpha", Path("/c/alpha.toml"), cred(), NOW)
    assert effects == (Fetch(),)
    assert rec.wake_at() == NOW
    assert rec.state(NOW) is CredentialState.PENDING


def test_success_installs_writes_then_announces() -> None:
    c, g = cred(), grant()
    rec, _ = scheduler.added("alpha", c.path, c, NOW)
    rec = scheduler.fetch_started(rec, NOW)
    assert rec.wake_at() == math.inf  # nothing more to do until the answer
    rec, effects = scheduler.fetch_succeeded(rec, c.identity, g, NOW, P, 0.5)
    assert effects == (Save(urgent=False), Write(g))
    assert rec.grant is g
    assert rec.write_pending
    assert not rec.attempted  # the files are not on disk yet
    rec, effects = scheduler.write_succeeded(rec, g, NOW)
    assert [type(e) for e in effects] == [RunAction, Notify]
    assert rec.attempted
    assert rec.state(NOW) is CredentialState.VALID
    assert rec.wake_at() == rec.due > NOW
    # The same token written again (a re-render) is not announced twice.
    assert scheduler.write_succeeded(replace(rec, write_pending=True), g, NOW)[1] == ()


def test_rotated_refresh_token_is_saved_before_the_token_is_written() -> None:
    c, g = cred(), grant(rt="rt-2")
    rec, _ = scheduler.added("alpha", c.path, c, NOW)
    rec = scheduler.fetch_started(rec, NOW)
    rec, effects = scheduler.fetch_succeeded(rec, c.identity, g, NOW, P, 0.5)
    assert effects == (Save(urgent=True), Write(g))
    assert rec.refresh_token is not None
    assert rec.refresh_token.reveal() == "rt-2"


def test_failure_keeps_the_token_and_backs_off() -> None:
    rec = fetched()
    rec = scheduler.fetch_started(rec, NOW + 100)
    after, effects = scheduler.fetch_failed(rec, cred().identity, TRANSIENT, NOW + 100, P, 0.5)
    assert after.grant is rec.grant
    assert after.state(NOW + 100) is CredentialState.STALE
    assert after.consecutive_failures == 1
    assert after.fetch_error is not None
    assert "http_503" in after.fetch_error
    assert NOW + 100 < after.due <= NOW + 100 + P.backoff_initial
    assert [e.hook for e in effects if isinstance(e, Notify)] == ["imsd_credential_failed"]


def test_permanent_error_waits_the_cap() -> None:
    rec, _ = scheduler.added("alpha", Path("/c/alpha.toml"), cred(), NOW)
    rec = scheduler.fetch_started(rec, NOW)
    rec, _ = scheduler.fetch_failed(rec, cred().identity, PERMANENT, NOW, P, 0.0)
    assert rec.due == NOW + P.backoff_cap
    assert rec.state(NOW) is CredentialState.EXPIRED


def test_a_change_during_a_fetch_discards_its_answer_and_fetches_again() -> None:
    old, new = cred("s1"), cred("s2")
    rec, _ = scheduler.added("alpha", old.path, old, NOW)
    rec = scheduler.fetch_started(rec, NOW)
    rec, effects = scheduler.changed(rec, new, NOW + 1)
    assert effects == ()  # the fetch in flight ends first
    assert rec.due == NOW + 1
    g = grant()
    rec, effects = scheduler.fetch_succeeded(rec, old.identity, g, NOW + 2, P, 0.5)
    assert rec.grant is None  # the old identity's token is not installed
    assert effects == (Fetch(),)
    assert rec.wake_at() == NOW + 2


def test_identity_change_keeps_serving_but_never_stores_the_old_token_as_new() -> None:
    rec = fetched(cred("s1"))
    rec, effects = scheduler.changed(rec, cred("s2"), NOW + 5)
    assert effects == (Fetch(),)
    assert rec.grant is not None  # still served until the new one arrives
    assert rec.serving(cred("s2").identity) is None
    assert rec.serving(cred("s1").identity) is rec.grant


def test_same_identity_change_rerenders() -> None:
    rec = fetched()
    c2 = replace(cred(), products=("aep",))
    assert c2.identity == cred().identity
    rec2, effects = scheduler.changed(rec, c2, NOW + 5)
    assert effects == (Write(rec.grant),)  # type: ignore[arg-type]
    assert rec2.due == rec.due


def test_restored_token_inside_the_margin_is_served_and_due_now() -> None:
    rec, _ = scheduler.added("alpha", Path("/c/alpha.toml"), cred(), NOW)
    g = grant(issued=NOW - DAY + 300)  # five minutes left, inside the 10-minute margin
    rec, effects = scheduler.restored(
        rec,
        identity=cred().identity,
        grant=g,
        refresh_token=None,
        now=NOW,
        policy=P,
        rand=0.5,
    )
    assert effects == (Write(g),)
    assert rec.grant is g
    assert rec.due == NOW
    assert rec.state(NOW) is CredentialState.VALID


def test_restored_under_another_identity_is_not_reused() -> None:
    rec, _ = scheduler.added("alpha", Path("/c/alpha.toml"), cred("s2"), NOW)
    out, effects = scheduler.restored(
        rec,
        identity=cred("s1").identity,
        grant=grant(),
        refresh_token=Secret("rt"),
        now=NOW,
        policy=P,
        rand=0.5,
    )
    assert (out, effects) == (rec, ())


def test_write_failure_retries_within_seconds_and_keeps_the_token() -> None:
    rec = fetched()
    g = rec.grant
    assert g is not None
    rec = replace(rec, write_pending=True)
    rec, _ = scheduler.write_failed(rec, g, "No space left on device", NOW, P, 0.99)
    assert rec.grant is g
    assert rec.last_error == scheduler.WRITE_ERROR_PREFIX + "No space left on device"
    assert NOW < rec.write_due <= NOW + 5
    assert rec.wake_at() == rec.write_due
    rec, _ = scheduler.write_succeeded(rec, g, NOW + 3)
    assert rec.last_error is None
    assert not rec.write_pending


def test_forced_refresh_limits() -> None:
    rec = fetched()
    assert scheduler.forced_refresh_at(rec, 30.0) == NOW + 30
    flying = scheduler.fetch_started(rec, NOW + 40)
    assert scheduler.forced_refresh_at(flying, 30.0) is None  # join it
    failing, _ = scheduler.fetch_failed(flying, cred().identity, throttled(120.0), NOW + 40, P, 0)
    assert scheduler.forced_refresh_at(failing, 0.0) == failing.due == NOW + 160


def test_a_429_is_retried_when_ims_said_while_the_token_is_still_served() -> None:
    """Issue 23: 21 s left, ``Retry-After: 5``, min_margin 19.5: retried after 1.5 s (at
    expires − min_margin). Now after 5 s, the token served meanwhile (stale)."""
    policy = RefreshPolicy(min_margin=19.5)
    rec = fetched(g=grant(issued=NOW - 100.0, life=121.0))  # expires at NOW + 21
    flying = scheduler.fetch_started(rec, NOW)
    failing, _ = scheduler.fetch_failed(flying, cred().identity, throttled(5.0), NOW, policy, 0.5)
    assert failing.due == NOW + 5.0
    assert failing.state(NOW + 4.9) is CredentialState.STALE
    # Past the token's expiry: its last second instead, still before it lapses.
    failing, _ = scheduler.fetch_failed(flying, cred().identity, throttled(60.0), NOW, policy, 0.5)
    assert failing.due == NOW + 20.0


# -- invariants -----------------------------------------------------------------------------

errors = st.one_of(
    st.just(TRANSIENT),
    st.just(PERMANENT),
    st.builds(throttled, st.one_of(st.none(), st.floats(0, 10 * DAY))),
)


@given(
    left=st.floats(1.0, DAY),
    error=errors,
    failures=st.integers(0, 50),
    rand=st.floats(0, 1, exclude_max=True),
)
def test_a_failure_never_drops_a_valid_token_and_waits_in_bounds(
    left: float, error: ImsError, failures: int, rand: float
) -> None:
    g = grant(issued=NOW + left - DAY)
    rec = replace(fetched(g=g), consecutive_failures=failures)
    now = NOW
    rec = scheduler.fetch_started(rec, now)
    after, _ = scheduler.fetch_failed(rec, cred().identity, error, now, P, rand)
    assert after.grant is g
    assert after.state(now) is CredentialState.STALE
    assert after.due >= now + MIN_WAIT - 1e-6  # never in the past
    if error.kind is ImsErrorKind.PERMANENT:
        assert after.due == now + P.backoff_cap  # never faster than the cap
    elif left > 1.0 + 1e-6:  # a fetch could still succeed: the last chance comes first
        assert after.due <= g.expires_at - min(P.backoff_initial, 1.0) + 1e-6


@given(rotated=st.booleans(), rand=st.floats(0, 1, exclude_max=True))
def test_save_precedes_write_and_due_is_before_the_margin(rotated: bool, rand: float) -> None:
    c = cred()
    g = grant(rt="rt-next" if rotated else None)
    rec, _ = scheduler.added("alpha", c.path, c, NOW)
    rec = scheduler.fetch_started(rec, NOW)
    rec, effects = scheduler.fetch_succeeded(rec, c.identity, g, NOW, P, rand)
    kinds = [type(e) for e in effects]
    assert kinds.index(Save) < kinds.index(Write)
    assert effects[0] == Save(urgent=rotated)
    assert NOW <= rec.due <= g.expires_at - P.min_margin + 1e-6


@given(secrets=st.lists(st.sampled_from(["s1", "s2", "s3"]), min_size=1, max_size=6))
def test_a_token_is_installed_only_for_the_identity_in_force(secrets: list[str]) -> None:
    """Whatever the sequence of edits while a fetch is in flight, the answer is installed
    only if the version in force still has the identity it was asked for."""
    first = cred(secrets[0])
    rec, _ = scheduler.added("alpha", first.path, first, NOW)
    rec = scheduler.fetch_started(rec, NOW)
    asked = first.identity
    for s in secrets[1:]:
        rec, _ = scheduler.changed(rec, cred(s), NOW)
    g = grant()
    rec, effects = scheduler.fetch_succeeded(rec, asked, g, NOW, P, 0.5)
    assert rec.credential is not None
    if rec.credential.identity == asked:
        assert rec.grant is g
    else:
        assert rec.grant is None
        assert effects == (Fetch(),)
