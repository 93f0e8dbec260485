"""Auth flows as plain generators, free of I/O (the httpx "auth flow" shape).

Auth methods (:class:`imsd.plugin.AuthMethod`, built-ins in ``imsd_plugins``) build their
flows from these pieces. A flow yields the :class:`~imsd.model.HttpRequest` it needs sent,
receives the :class:`~imsd.model.HttpResponse` through ``send()``, and finally returns a
:class:`~imsd.model.Grant` (or raises :class:`~imsd.model.ImsError`). The thin driver in
:mod:`imsd.exchange` does the HTTP; tests drive flows with canned responses.

Expiry comes from the token's own claims (``created_at`` + ``expires_in``, both milliseconds,
IMS sends them as strings), falling back to the response's ``expires_in`` in the endpoint's
unit: seconds for ``/ims/token/v2`` and ``v3``, milliseconds for ``v1`` and
``/ims/exchange/jwt``.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Final, Protocol

from imsd.model import (
    Credential,
    CredentialError,
    Grant,
    HttpRequest,
    HttpResponse,
    ImsError,
    ImsErrorKind,
    Secret,
    usable_time,
)

__all__ = [
    "AuthMethodLike",
    "CredentialView",
    "Flow",
    "check_grant",
    "classify_error",
    "credential_view",
    "debug_id",
    "expires_in_unit",
    "flow_for",
    "is_bearer_token",
    "parse_token_response",
]

Flow = Generator[HttpRequest, HttpResponse, Grant]


@dataclass(frozen=True, slots=True)
class CredentialView:
    """What an auth method's flow sees of a credential: the fields IMS needs, never where the
    file is, its digest or the daemon's actions (:class:`imsd.plugin.AuthMethod`).

    ``options`` are what the method's ``validate`` returned (its own fields, secrets among
    them as :class:`~imsd.model.Secret` values: a private key, a refresh token...).

    .. versionadded:: API 1.2
    """

    name: str
    auth: str
    client_id: str
    client_secret: Secret
    org_id: str
    scopes: tuple[str, ...]
    ims_url: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # options may hold anything a method validated
        return f"CredentialView(name={self.name!r}, auth={self.auth!r})"


def credential_view(cred: Credential) -> CredentialView:
    """The :class:`CredentialView` of *cred*, what its auth method's flow receives."""
    return CredentialView(
        cred.name,
        cred.auth,
        cred.client_id,
        cred.client_secret,
        cred.org_id,
        cred.scopes,
        cred.ims_url,
        cred.options,
    )


class AuthMethodLike(Protocol):
    """What :func:`flow_for` needs of an auth method (:class:`imsd.plugin.AuthMethod`)."""

    def flow(self, view: CredentialView, now: float, refresh_token: Secret | None) -> Flow: ...


#: Errors that retrying cannot fix: the credential file must change.
PERMANENT_CODES: Final = frozenset(
    {
        "invalid_client",
        "invalid_scope",
        "unauthorized_client",
        "invalid_grant",
        "unsupported_grant_type",
        "invalid_request",
        "invalid_signature",
        "bad_request",
    }
)
_MAX_LIFETIME: Final = 366 * 86400.0  # IMS tokens live a day; a year is certainly wrong
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]+")
_BEARER: Final = "bearer"
# RFC 6750 b64token, the only syntax a bearer token can take in an Authorization header. Real
# IMS tokens are JWTs (base64url and dots); anything else is corrupt or hostile, and a quote or
# a backslash would read differently in an env file than in the token file.
_B64TOKEN: Final = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_MAX_TOKEN: Final = 16384
_DIGITS: Final = re.compile(r"[0-9]{1,16}(\.[0-9]{1,16})?")
_SECONDS: Final = re.compile(r"[0-9]+")  # Retry-After delta-seconds
_DEBUG_ID: Final = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
#: An ``invalid_token`` about the assertion itself (missing, undecodable, malformed), which a
#: retry signs the same way again; an expired one (a clock skew) may pass on retry.
_BROKEN_ASSERTION: Final = re.compile(r"missing|absent|decod|malformed|pars(e|ing)", re.I)


def expires_in_unit(path: str) -> str:
    """``"ms"`` for ``/ims/token/v1`` and ``/ims/exchange/jwt``, else ``"s"``."""
    p = path.rstrip("/")
    return "ms" if p.endswith(("/ims/token/v1", "/ims/exchange/jwt")) else "s"


def _clean(text: Any, limit: int = 200) -> str:
    return _CONTROL.sub(" ", str(text))[:limit].strip()


def _retry_after(value: str | None, now: float) -> float | None:
    if not value:
        return None
    value = value.strip()
    if _SECONDS.fullmatch(value):  # str.isdigit() also takes "²", which float() refuses
        return float(value)  # a 400-digit value is inf: the scheduler caps it
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _json(resp: HttpResponse) -> Any:
    try:
        return json.loads(resp.body)
    except (ValueError, UnicodeDecodeError):
        return None


def debug_id(resp: HttpResponse) -> str | None:
    """IMS's ``x-debug-id`` header (Adobe support asks for it), if it has a sane shape."""
    value = resp.headers.get("x-debug-id", "").strip()
    return value if _DEBUG_ID.fullmatch(value) else None


def _permanent(code: str, description: str, status: int) -> bool:
    if status >= 500:
        return False
    if code == "invalid_token":  # JWT exchange: see _BROKEN_ASSERTION
        return _BROKEN_ASSERTION.search(description) is not None
    return code in PERMANENT_CODES


def classify_error(resp: HttpResponse, *, now: float = 0.0) -> ImsError:
    """Turn a non-2xx IMS answer into a classified error (never quoting the request), with
    its ``x-debug-id``."""
    error = _classify(resp, now)
    error.debug_id = debug_id(resp)
    return error


def _classify(resp: HttpResponse, now: float) -> ImsError:
    body = _json(resp)
    code, description = "", ""
    if isinstance(body, dict):
        code = _clean(body.get("error") or body.get("error_code") or "", 64)
        description = _clean(body.get("error_description") or body.get("message") or "")
    if resp.status == 429:
        return ImsError(
            ImsErrorKind.THROTTLED,
            code or "too_many_requests",
            description,
            status=resp.status,
            retry_after=_retry_after(resp.headers.get("retry-after"), now),
        )
    if _permanent(code, description, resp.status):
        return ImsError(ImsErrorKind.PERMANENT, code, description, status=resp.status)
    if resp.status in (401, 403) and not code:
        return ImsError(ImsErrorKind.PERMANENT, "unauthorized", description, status=resp.status)
    return ImsError(
        ImsErrorKind.TRANSIENT, code or f"http_{resp.status}", description, status=resp.status
    )


def _claims(token: str) -> dict[str, Any]:
    """The payload of a JWT-shaped token, unverified (IMS tokens are checked by IMS)."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        raw = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return claims if isinstance(claims, dict) else {}


def _number(value: Any) -> float | None:
    """A finite float from a JSON number or a digit string, else None. IMS's JSON may carry
    NaN, Infinity or a 400-digit integer (which ``float()`` cannot even convert)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
        value = float(value)
    if not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _invalid(why: str, status: int | None) -> ImsError:
    return ImsError(ImsErrorKind.TRANSIENT, "invalid_response", why, status=status)


def _usable(token: str) -> bool:
    return bool(token) and len(token) <= _MAX_TOKEN and token.isprintable() and " " not in token


def is_bearer_token(token: str) -> bool:
    """Whether *token* can be published as an access token: an RFC 6750 b64token (which
    every output format carries verbatim), of a sane length."""
    return len(token) <= _MAX_TOKEN and _B64TOKEN.fullmatch(token) is not None


def parse_token_response(resp: HttpResponse, *, now: float, unit: str = "s") -> Grant:
    """A Grant from a 2xx token response, or ImsError. Never echoes the body."""
    if not 200 <= resp.status < 300:
        raise classify_error(resp, now=now)
    body = _json(resp)
    if not isinstance(body, dict):
        raise _invalid("response is not a JSON object", resp.status)
    token = body.get("access_token")
    if not isinstance(token, str) or not _usable(token):
        raise _invalid("response has no usable access_token", resp.status)
    kind = body.get("token_type", _BEARER)
    if not isinstance(kind, str) or kind.lower() != _BEARER:
        # Every output presents the token as "Bearer": another type would be mislabelled.
        raise _invalid("token_type is not bearer", resp.status)
    token_type = _BEARER
    claims = _claims(token)
    for key in ("created_at", "expires_in"):
        if key in claims and _number(claims[key]) is None:
            raise _invalid(f"token claim {key} is not a finite number", resp.status)
    created, lifetime_ms = _number(claims.get("created_at")), _number(claims.get("expires_in"))
    if created is not None and lifetime_ms is not None and 0 < lifetime_ms <= _MAX_LIFETIME * 1e3:
        issued, expires = created / 1000.0, (created + lifetime_ms) / 1000.0
        # A token minted by a clock far from ours: trust its lifetime, anchor it on our clock.
        if abs(issued - now) > 300:
            issued, expires = now, now + lifetime_ms / 1000.0
    else:
        expires_in = _number(body.get("expires_in"))
        if expires_in is None:
            raise _invalid("response has no usable expires_in", resp.status)
        seconds = expires_in / 1000.0 if unit == "ms" else expires_in
        if not 0 < seconds <= _MAX_LIFETIME:
            raise _invalid("expires_in is out of range", resp.status)
        issued, expires = now, now + seconds
    if expires <= now:
        raise _invalid("token is already expired", resp.status)
    rotated = body.get("refresh_token")
    refresh = Secret(rotated) if isinstance(rotated, str) and _usable(rotated) else None
    return check_grant(Grant(Secret(token), token_type, issued, expires, refresh), resp.status)


def check_grant(grant: Grant, status: int | None = None) -> Grant:
    """*grant* if its times are usable (finite, in range, expiry after issue) and it is a
    bearer token (type and syntax), else the ImsError of an invalid response: whatever an
    auth method computed, a NaN, an absurd time, another token type or a token no header
    can carry must fail the attempt (the last good token stays published), not crash the
    scheduler or the renderer later, nor be published."""
    if not (
        usable_time(grant.issued_at)
        and usable_time(grant.expires_at)
        and grant.expires_at > grant.issued_at
    ):
        raise _invalid("token times are not finite or out of range", status)
    if not isinstance(grant.token_type, str) or grant.token_type.lower() != _BEARER:
        raise _invalid("token_type is not bearer", status)
    if not is_bearer_token(grant.access_token.reveal()):
        raise _invalid("access_token is not an RFC 6750 bearer token", status)
    return grant


def flow_for(
    cred: Credential,
    methods: Mapping[str, AuthMethodLike],
    *,
    now: float,
    refresh_token: Secret | None = None,
) -> Flow:
    """The flow of *cred*'s auth method (an :class:`imsd.plugin.AuthMethod`), which sees only
    the credential's :class:`CredentialView`."""
    method = methods.get(cred.auth)
    if method is None:
        raise CredentialError(cred.path, f"unsupported auth method {cred.auth!r}", field="auth")
    return method.flow(credential_view(cred), now, refresh_token)
