"""The fake IMS's user login: ``/ims/authorize/v2`` with a consent step, and the
``authorization_code`` grant of ``/ims/token/v3``.

What it plays (Adobe's "User Authentication Credentials API Reference", UserAuthentication/
IMS.md, and the implementation guide, UserAuthentication/implementation.md, in
AdobeDocs/adobe-dev-console):

- a credential registers a Default redirect URI and a Redirect URI pattern (regular
  expressions, comma-separated); a requested ``redirect_uri`` that does not match the pattern
  (or none) sends the user to the default one;
- Web App credentials are confidential (client secret at the token endpoint); Single Page
  App and Native App credentials are public and must use PKCE (``code_challenge``, method
  ``S256`` or ``plain``, the default), and get no refresh token;
- a refresh token is issued only when ``offline_access`` was requested and consented to.

A test drives the consent as a browser would: GET the authorize URL, POST the page's form
(``/ims/authorize/v2/consent``, ``request``, ``approve=yes|no`` and optionally ``user``, the
account that logs in, default a new ``…@AdobeID``), follow the 302. Codes are single-use and
live :data:`CODE_LIFETIME` seconds; the tokens they give carry the user's id (``sub``,
``id_token`` with ``openid``, the access token's ``user_id``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qsl, urlencode, urlsplit

from imsd.httpserver import Request, Response

if TYPE_CHECKING:
    from imsd.fakeims.state import FakeImsState, TokenReply

__all__ = ["CODE_LIFETIME", "Authorizations", "Registration", "authorization_code", "handle"]

CODE_LIFETIME: Final = 300.0
OFFLINE: Final = "offline_access"
AUTHORIZE_PATH: Final = "/ims/authorize/v2"
CONSENT_PATH: Final = "/ims/authorize/v2/consent"
_USER: Final = re.compile(r"[A-Za-z0-9._@+-]{1,64}")


@dataclass(frozen=True, slots=True)
class Registration:
    """A user-auth credential's Console settings."""

    default_redirect_uri: str
    redirect_pattern: str  # comma-separated regular expressions, matched in full
    public: bool = False  # Single Page App / Native App: PKCE, no secret, no refresh token

    def redirect_for(self, requested: str | None) -> str:
        patterns = [p.strip() for p in self.redirect_pattern.split(",") if p.strip()]
        if requested and any(re.fullmatch(p, requested) for p in patterns):
            return requested
        return self.default_redirect_uri


@dataclass(frozen=True, slots=True)
class _Pending:
    client_id: str
    redirect_uri: str
    scopes: frozenset[str]
    state: str | None
    challenge: str | None
    method: str


@dataclass(frozen=True, slots=True)
class _Code:
    pending: _Pending
    user_id: str
    expires: float


@dataclass
class Authorizations:
    """Registrations, consents waiting for an answer, and issued codes (guarded by the
    state's lock)."""

    registrations: dict[str, Registration] = field(default_factory=dict)
    pending: dict[str, _Pending] = field(default_factory=dict)
    codes: dict[str, _Code] = field(default_factory=dict)


def _error_page(status: int, code: str, text: str) -> Response:
    return Response.json({"error": code, "error_description": text}, status)


def _redirect(uri: str, params: Mapping[str, str]) -> Response:
    sep = "&" if urlsplit(uri).query else "?"
    return Response(302, b"", [("Location", uri + sep + urlencode(params))])


def _scopes(raw: str) -> frozenset[str]:
    return frozenset(s for s in re.split(r"[,\s]+", raw) if s)


def _authorize(state: FakeImsState, params: Mapping[str, str]) -> Response:
    client_id = params.get("client_id", "")
    with state._lock:
        client = state.clients.get(client_id)
        reg = state.authorize.registrations.get(client_id)
    if client is None or reg is None:
        # No redirect: the redirect URI of an unknown client cannot be trusted.
        return _error_page(400, "invalid_client", "unknown client_id or not a user-auth client")
    redirect = reg.redirect_for(params.get("redirect_uri"))
    back = {"state": params["state"]} if "state" in params else {}
    if params.get("response_type", "code") != "code":
        return _redirect(redirect, {"error": "unsupported_response_type", **back})
    scopes = _scopes(params.get("scope", ""))
    allowed = client.scopes | ({OFFLINE} if not reg.public else frozenset())
    if not scopes <= allowed:
        return _redirect(redirect, {"error": "invalid_scope", **back})
    challenge = params.get("code_challenge") or None
    method = params.get("code_challenge_method", "plain")
    if method not in ("S256", "plain") or (reg.public and challenge is None):
        return _redirect(redirect, {"error": "invalid_request", **back})
    request_id = secrets.token_urlsafe(16)
    with state._lock:
        state.authorize.pending[request_id] = _Pending(
            client_id, redirect, scopes, params.get("state"), challenge, method
        )
    names = ", ".join(sorted(scopes)) or "(none)"
    page = (
        "<!doctype html><title>Fake IMS consent</title>"
        f"<p>Allow {html.escape(client_id)} access to: {html.escape(names)}?</p>"
        f'<form method="post" action="{CONSENT_PATH}">'
        f'<input type="hidden" name="request" value="{request_id}">'
        '<input name="user" placeholder="user id (optional)">'
        '<button name="approve" value="yes">Allow</button>'
        '<button name="approve" value="no">Cancel</button></form>\n'
    )
    return Response.text(page, content_type="text/html; charset=utf-8")


def _consent(state: FakeImsState, params: Mapping[str, str]) -> Response:
    with state._lock:
        pending = state.authorize.pending.pop(params.get("request", ""), None)
    if pending is None:
        return _error_page(400, "invalid_request", "unknown or answered consent request")
    back = {"state": pending.state} if pending.state is not None else {}
    if params.get("approve") != "yes":
        return _redirect(
            pending.redirect_uri,
            {"error": "access_denied", "error_description": "the user cancelled", **back},
        )
    user = params.get("user") or f"{secrets.token_hex(12).upper()}@AdobeID"
    if not _USER.fullmatch(user):
        return _error_page(400, "invalid_request", "user: letters, digits and ._@+- only")
    code = secrets.token_urlsafe(24)
    with state._lock:
        state.authorize.codes[code] = _Code(pending, user, state.clock() + CODE_LIFETIME)
    return _redirect(pending.redirect_uri, {"code": code, **back})


def handle(state: FakeImsState, req: Request, path: str) -> Response:
    """Answer a request under ``/ims/authorize/v2``."""
    params = {k: v[-1] for k, v in req.query.items()}
    if req.body:
        params.update(parse_qsl(req.body.decode("utf-8", "replace"), keep_blank_values=True))
    if path == AUTHORIZE_PATH and req.method == "GET":
        return _authorize(state, params)
    if path == CONSENT_PATH and req.method == "POST":
        return _consent(state, params)
    return _error_page(405, "invalid_request", "GET the authorize URL, POST the consent form")


def _verifier_matches(code: _Code, verifier: str) -> bool:
    challenge = code.pending.challenge
    if challenge is None:
        return True  # PKCE is optional for confidential clients
    if not 43 <= len(verifier) <= 128:
        return False
    if code.pending.method == "S256":
        digest = hashlib.sha256(verifier.encode()).digest()
        verifier = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    return hmac.compare_digest(verifier, challenge)


def authorization_code(
    state: FakeImsState, params: Mapping[str, str], origin: str | None
) -> TokenReply:
    """``grant_type=authorization_code`` (called by the token endpoint, lock held)."""
    from imsd.fakeims.state import Client

    client_id = params.get("client_id", "")
    reg = state.authorize.registrations.get(client_id)
    if reg is None or not reg.public:
        client = state._authenticate(params)
        if not isinstance(client, Client):
            return client
        if reg is None:
            return _fail(400, "unauthorized_client", "the client has no user authentication")
    else:
        found = state.clients.get(client_id)
        if found is None:
            return _fail(400, "invalid_client", "unknown client_id")
        client = found
    code = state.authorize.codes.pop(params.get("code", ""), None)  # single use
    if code is None or code.pending.client_id != client.client_id:
        return _fail(400, "invalid_grant", "the code is invalid or was already used")
    if code.expires <= state.clock():
        return _fail(400, "invalid_grant", "the code has expired")
    if reg.public and code.pending.challenge is None:
        return _fail(400, "invalid_request", "public clients use PKCE")
    if not _verifier_matches(code, params.get("code_verifier", "")):
        return _fail(400, "invalid_grant", "code_verifier does not match the code_challenge")
    scopes = code.pending.scopes
    token, lifetime = state.mint(client, scopes - {OFFLINE}, user_id=code.user_id)
    body: dict[str, object] = {
        "access_token": token,
        "token_type": "bearer",
        "expires_in": int(lifetime),
        "sub": code.user_id,
    }
    if "openid" in scopes:
        body["id_token"] = state._sign(
            {"type": "id_token", "sub": code.user_id, "aud": client.client_id, "as": state.ims_as}
        )
    if OFFLINE in scopes and not reg.public:
        body["refresh_token"] = state._new_refresh_token(client, scopes, code.user_id)
    return 200, body, {}


def _fail(status: int, code: str, description: str) -> TokenReply:
    return status, {"error": code, "error_description": description}, {}
