from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from imsd.credentials import builtin_auth_methods
from imsd.flows import (
    Flow,
    check_grant,
    classify_error,
    expires_in_unit,
    flow_for,
    parse_token_response,
)
from imsd.model import (
    Credential,
    CredentialError,
    Grant,
    HttpResponse,
    ImsError,
    ImsErrorKind,
    Secret,
)
from imsd.render import rfc3339

NOW = 1_800_000_000.0
SECRET = "p8e-FlowSecret-0123456789"


def client_credentials_flow(cred: Credential, now: float) -> Flow:
    """The built-in S2S method's flow, reached the way the daemon reaches it."""
    return flow_for(cred, builtin_auth_methods(), now=now)


def cred(**kw: Any) -> Credential:
    base: dict[str, Any] = dict(
        name="c",
        path=Path("/c.toml"),
        auth="oauth_server_to_server",
        client_id="cid",
        client_secret=Secret(SECRET),
        org_id="o@AdobeOrg",
        scopes=("openid", "AdobeID"),
        ims_url="https://ims-na1.adobelogin.com/",
    )
    return Credential(**{**base, **kw})


def jwt_token(claims: dict[str, Any]) -> str:
    def enc(obj: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{enc({'alg': 'RS256'})}.{enc(claims)}.c2ln"


def resp(status: int, body: Any, **headers: str) -> HttpResponse:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return HttpResponse(status, headers, raw)


def test_flow_builds_the_documented_request_and_returns_a_grant() -> None:
    flow = client_credentials_flow(cred(), NOW)
    req = next(flow)
    assert (req.method, req.url) == ("POST", "https://ims-na1.adobelogin.com/ims/token/v3")
    assert req.form == {
        "grant_type": "client_credentials",
        "client_id": "cid",
        "client_secret": SECRET,
        "scope": "openid,AdobeID",
    }
    assert SECRET not in repr(req)
    with pytest.raises(StopIteration) as stop:
        flow.send(resp(200, {"access_token": "tok", "token_type": "bearer", "expires_in": 86399}))
    grant = stop.value.value
    assert (grant.issued_at, grant.expires_at) == (NOW, NOW + 86399)


@pytest.mark.parametrize(
    ("body", "unit", "lifetime"),
    [
        ({"access_token": "t", "expires_in": 86399}, "s", 86399),
        ({"access_token": "t", "expires_in": 86399999}, "ms", 86399.999),
        ({"access_token": "t", "expires_in": "3600"}, "s", 3600),
        # The token's own claims win over the response field.
        (
            {
                "access_token": jwt_token(
                    {"created_at": str(int(NOW * 1000)), "expires_in": "7200000"}
                ),
                "expires_in": 5,
            },
            "s",
            7200,
        ),
    ],
)
def test_lifetime(body: dict[str, Any], unit: str, lifetime: float) -> None:
    g = parse_token_response(resp(200, body), now=NOW, unit=unit)
    assert g.expires_at - g.issued_at == pytest.approx(lifetime)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        {"expires_in": 10},
        {"access_token": "", "expires_in": 10},
        {"access_token": "t"},
        {"access_token": "t", "expires_in": -5},
        {"access_token": "t", "expires_in": 10**12},
        {"access_token": "a b", "expires_in": 10},
        {"access_token": "t", "expires_in": True},
        {"access_token": "t", "expires_in": float("nan")},
        {"access_token": "t", "expires_in": float("inf")},
        {"access_token": "t", "expires_in": 10**400},  # float() cannot convert it
        # Claims that are present but not finite numbers fail the attempt (no fallback).
        {
            "access_token": jwt_token({"created_at": float("nan"), "expires_in": "60000"}),
            "expires_in": 60,
        },
        {
            "access_token": jwt_token({"created_at": float("inf"), "expires_in": "60000"}),
            "expires_in": 60,
        },
        {
            "access_token": jwt_token({"created_at": 10**400, "expires_in": "60000"}),
            "expires_in": 60,
        },
        {
            "access_token": jwt_token(
                {"created_at": str(int(NOW * 1000)), "expires_in": float("nan")}
            ),
            "expires_in": 60,
        },
        {
            "access_token": jwt_token({"created_at": str(int(NOW * 1000)), "expires_in": "NaN"}),
            "expires_in": 60,
        },
    ],
)
def test_malformed_success_is_transient(body: Any) -> None:
    with pytest.raises(ImsError) as err:
        parse_token_response(resp(200, body), now=NOW)
    assert err.value.kind is ImsErrorKind.TRANSIENT
    assert err.value.code == "invalid_response"


@pytest.mark.parametrize(
    ("token_type", "accepted"),
    [
        ("bearer", True),
        ("Bearer", True),
        ("BEARER", True),
        (None, True),  # absent: IMS's bearer
        ("mac", False),
        ("DPoP", False),
        ("N_A", False),
        ("", False),
        ("bearer ", False),
        (1, False),
        (["bearer"], False),
    ],
)
def test_token_type_must_be_bearer(token_type: Any, accepted: bool) -> None:
    """Every output presents the token as ``Bearer``: any other type is refused, not relabelled."""
    body: dict[str, Any] = {"access_token": "tok", "expires_in": 60}
    if token_type is not None:
        body["token_type"] = token_type
    if accepted:
        assert parse_token_response(resp(200, body), now=NOW).token_type == "bearer"
        return
    with pytest.raises(ImsError) as err:
        parse_token_response(resp(200, body), now=NOW)
    assert (err.value.kind, err.value.code) == (ImsErrorKind.TRANSIENT, "invalid_response")
    assert "token_type is not bearer" in str(err.value)
    # … and so is a plugin's own Grant of another type
    with pytest.raises(ImsError, match="token_type is not bearer"):
        check_grant(Grant(Secret("t"), str(token_type), NOW, NOW + 60))


@pytest.mark.parametrize(
    ("token", "accepted"),
    [
        (jwt_token({"a": 1}), True),
        ("AbC-._~+/09==", True),  # every RFC 6750 b64token character
        ("a\\b", False),  # reads as "ab" in a systemd env file
        ('"abc', False),  # systemd unquotes a leading quote
        ("'abc", False),
        ("a=b", False),  # "=" only as trailing padding
        ("a,b", False),
        ("a\u00e9b", False),
        ("x" * 16385, False),
    ],
)
def test_access_token_must_be_a_bearer_token(token: str, accepted: bool) -> None:
    """Real IMS tokens are JWTs (base64url and dots). A token outside RFC 6750's b64token
    cannot go into an Authorization header as is and reads differently in the env and
    token files: the answer is invalid, and the last good token stays published."""
    body = {"access_token": token, "token_type": "bearer", "expires_in": 60}
    if accepted:
        assert parse_token_response(resp(200, body), now=NOW).access_token.reveal() == token
        return
    with pytest.raises(ImsError) as err:
        parse_token_response(resp(200, body), now=NOW)
    assert (err.value.kind, err.value.code) == (ImsErrorKind.TRANSIENT, "invalid_response")
    assert token not in str(err.value)
    with pytest.raises(ImsError, match="invalid_response"):  # a plugin's own Grant too
        check_grant(Grant(Secret(token), "bearer", NOW, NOW + 60))


def test_check_grant_refuses_unusable_times() -> None:
    ok = Grant(Secret("t"), "bearer", NOW, NOW + 60)
    assert check_grant(ok) is ok
    for issued, expires in [
        (float("nan"), NOW),
        (NOW, float("nan")),
        (NOW, float("inf")),
        (-1.0, NOW),
        (NOW, 1e300),
        (NOW, NOW),
    ]:
        with pytest.raises(ImsError, match="invalid_response"):
            check_grant(Grant(Secret("t"), "bearer", issued, expires))


@pytest.mark.parametrize(
    ("status", "body", "headers", "kind", "code"),
    [
        (
            401,
            {"error": "invalid_client", "error_description": "bad"},
            {},
            ImsErrorKind.PERMANENT,
            "invalid_client",
        ),
        (400, {"error": "invalid_scope"}, {}, ImsErrorKind.PERMANENT, "invalid_scope"),
        (400, {"error": "invalid_grant"}, {}, ImsErrorKind.PERMANENT, "invalid_grant"),
        (
            429,
            {"error_code": "429050", "message": "Too many requests"},
            {"retry-after": "7"},
            ImsErrorKind.THROTTLED,
            "429050",
        ),
        (503, b"<html>", {}, ImsErrorKind.TRANSIENT, "http_503"),
        (500, {"error": "server_error"}, {}, ImsErrorKind.TRANSIENT, "server_error"),
        (401, b"", {}, ImsErrorKind.PERMANENT, "unauthorized"),
    ],
)
def test_classify(
    status: int, body: Any, headers: dict[str, str], kind: ImsErrorKind, code: str
) -> None:
    e = classify_error(resp(status, body, **headers), now=NOW)
    assert (e.kind, e.code, e.status) == (kind, code, status)
    if status == 429:
        assert e.retry_after == 7


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("7", 7.0),
        (" 120 ", 120.0),
        ("9" * 400, float("inf")),  # parsed, then capped by the scheduler
        ("\u00b2", None),  # "²".isdigit() is True, float("²") raises
        ("-5", None),
        ("1.5", None),
        ("Fri, 15 Jan 2027 08:00:10 GMT", 7210.0),
        ("Fri, 31 Dec 9999 23:59:59 GMT", 253402300799.0 - 1_799_992_800.0),
        ("Mon, 01 Jan 1990 00:00:00 GMT", 0.0),
    ],
)
def test_retry_after_values(header: str, expected: float | None) -> None:
    e = classify_error(resp(429, {}, **{"retry-after": header}), now=1_799_992_800.0)
    assert e.retry_after == (pytest.approx(expected) if expected is not None else None)


def test_retry_after_http_date() -> None:
    e = classify_error(
        resp(429, {}, **{"retry-after": "Fri, 15 Jan 2027 08:00:10 GMT"}), now=1_799_992_800.0
    )  # 2027-01-15T06:00:00Z
    assert e.retry_after == pytest.approx(7210.0)


def test_units_and_registry() -> None:
    assert expires_in_unit("/ims/token/v1/") == "ms"
    assert expires_in_unit("/ims/exchange/jwt") == "ms"
    assert expires_in_unit("/ims/token/v3") == "s"
    with pytest.raises(CredentialError, match="unsupported auth method"):
        flow_for(cred(auth="password"), {}, now=NOW)


@given(
    status=st.integers(100, 599),
    body=st.binary(max_size=300),
    retry=st.one_of(st.none(), st.text(max_size=30)),
)
def test_fuzz_responses_never_crash_or_leak(status: int, body: bytes, retry: str | None) -> None:
    headers = {} if retry is None else {"retry-after": retry}
    error: ImsError | None = None
    try:
        g = parse_token_response(HttpResponse(status, headers, body), now=NOW)
    except ImsError as e:
        error = e
    if error is None:
        assert 200 <= status < 300
        assert g.expires_at > NOW
    else:
        assert SECRET not in str(error)
        assert len(str(error)) < 400


_NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.text(max_size=20),
    st.none(),
)


@given(created=_NUMBERS, life=_NUMBERS, expires_in=_NUMBERS)
def test_numbers_from_ims_never_crash(created: Any, life: Any, expires_in: Any) -> None:
    """Whatever numbers the claims and the body carry, the answer is a Grant whose times
    render, or an invalid_response; never another exception."""
    claims = {k: v for k, v in (("created_at", created), ("expires_in", life)) if v is not None}
    body = {"access_token": jwt_token(claims), "expires_in": expires_in}
    error: ImsError | None = None
    try:
        g = parse_token_response(resp(200, body), now=NOW)
    except ImsError as e:
        error = e
    if error is not None:
        assert error.code == "invalid_response"
        return
    assert NOW - 300 <= g.issued_at < g.expires_at <= NOW + 300 + 366 * 86400
    rfc3339(g.issued_at), rfc3339(g.expires_at)


@pytest.mark.parametrize(
    ("description", "kind"),
    [
        ("jwt_token is missing", ImsErrorKind.PERMANENT),
        ("the JWT cannot be decoded", ImsErrorKind.PERMANENT),
        ("Malformed JWT", ImsErrorKind.PERMANENT),
        ("the JWT has expired", ImsErrorKind.TRANSIENT),  # a clock skew: a retry may pass
        ("", ImsErrorKind.TRANSIENT),
    ],
)
def test_a_jwt_invalid_token_about_the_assertion_itself_is_permanent(
    description: str, kind: ImsErrorKind
) -> None:
    """IMS's JWT table: invalid_token for a missing or undecodable JWT (signing it again the
    same way cannot help) and for an expired one (a new assertion may pass)."""
    body = {"error": "invalid_token", "error_description": description}
    assert classify_error(resp(400, body), now=NOW).kind is kind
    assert classify_error(resp(503, body), now=NOW).kind is ImsErrorKind.TRANSIENT


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("a1b2c3d4e5f60718", "a1b2c3d4e5f60718"),
        (" 5f1c-AB:9/x+y= ", "5f1c-AB:9/x+y="),
        ("bad id\x1b[2J", None),  # a terminal escape from a hostile proxy: dropped
        ("x" * 129, None),
        (None, None),
    ],
)
def test_every_classified_error_carries_the_ims_debug_id(
    header: str | None, expected: str | None
) -> None:
    """Adobe support asks for IMS's x-debug-id: each failure keeps it, when it is sane."""
    headers = {} if header is None else {"x-debug-id": header}
    for status, body in ((401, {"error": "invalid_client"}), (429, {}), (503, b"<html>")):
        e = classify_error(resp(status, body, **headers), now=NOW)
        assert e.debug_id == expected
        assert header is None or header.strip() not in str(e)  # a field, not in the message
