"""The fake Analytics discovery endpoint: ``GET /discovery/me`` as analytics.adobe.io serves
it (https://developer.adobe.com/analytics-apis/docs/2.0/guides/endpoints/discovery/), plus
``POST /_fake/companies`` to set a client's companies from another process.

The answer is Adobe's shape: ``{"imsUserId", "imsOrgs": [{"imsOrgId", "companies":
[{"globalCompanyId", "companyName", "apiRateLimitPolicy"}]}]}``, for the org of the token's
client. Like the gateway, it wants ``Authorization: Bearer`` with one of this fake's tokens and
``x-api-key`` naming the token's client, and answers in the gateway's error format otherwise.

A client has one company, :data:`DEFAULT_COMPANY`, until :func:`set_companies` says
otherwise (an empty list: a client in no Analytics company). The companies live beside the
fake's state, keyed by it, so that module needs nothing for them.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Final

from imsd.fakeims.state import FakeImsState
from imsd.httpserver import Request, Response

__all__ = ["DEFAULT_COMPANY", "PATHS", "companies_of", "handle", "set_companies"]

PATHS: Final = frozenset({"/discovery/me", "/_fake/companies"})
DEFAULT_COMPANY: Final[Mapping[str, str]] = {
    "globalCompanyId": "fakeco0",
    "companyName": "Fake Company",
    "apiRateLimitPolicy": "aa_api_tier10_tp",
}

_lock = threading.Lock()
# id(state) → client_id → companies; an entry goes with its state (weakref.finalize).
_companies: dict[int, dict[str, list[dict[str, str]]]] = {}


def _table(state: FakeImsState) -> dict[str, list[dict[str, str]]]:
    key = id(state)
    table = _companies.get(key)
    if table is None:
        table = _companies[key] = {}
        weakref.finalize(state, _companies.pop, key, None)
    return table


def set_companies(
    state: FakeImsState, client_id: str, companies: Sequence[Mapping[str, str]]
) -> None:
    """Make *client_id*'s discovery list *companies* (each with at least ``globalCompanyId``;
    ``companyName`` and ``apiRateLimitPolicy`` are filled in when absent)."""
    listed = [
        {
            "globalCompanyId": str(c["globalCompanyId"]),
            "companyName": str(c.get("companyName", c["globalCompanyId"])),
            "apiRateLimitPolicy": str(c.get("apiRateLimitPolicy", "aa_api_tier10_tp")),
        }
        for c in companies
    ]
    with _lock:
        _table(state)[client_id] = listed


def companies_of(state: FakeImsState, client_id: str) -> list[dict[str, str]]:
    with _lock:
        listed = _companies.get(id(state), {}).get(client_id)
    return [dict(DEFAULT_COMPANY)] if listed is None else [dict(c) for c in listed]


def _error(status: int, code: str, message: str) -> Response:
    return Response.json({"error_code": code, "message": message}, status=status)


def _me(state: FakeImsState, req: Request) -> Response:
    if req.method != "GET":
        return _error(405, "405000", "use GET")
    auth = req.header("authorization") or ""
    if not auth:
        return _error(403, "403010", "Oauth token is missing.")
    claims = state.validate_token(auth[7:].strip()) if auth[:7].lower() == "bearer " else None
    if claims is None:
        return _error(401, "401013", "Oauth token is not valid")
    api_key = req.header("x-api-key")
    if not api_key:
        return _error(403, "403000", "Api Key is required")
    if api_key != claims.get("client_id"):
        return _error(403, "403003", "Api Key is invalid")
    client_id = str(claims["client_id"])
    client = state.client(client_id)  # tokens carry no org claim; the client has the org
    return Response.json(
        {
            "imsUserId": str(claims.get("user_id", client_id)),
            "imsOrgs": [
                {
                    "imsOrgId": client.org_id if client is not None else "",
                    "companies": companies_of(state, client_id),
                }
            ],
        }
    )


def _control(state: FakeImsState, req: Request) -> Response:
    if req.method != "POST":
        return Response.json({"error": "invalid_request", "error_description": "use POST"}, 405)
    try:
        body = json.loads(req.body or b"{}")
        set_companies(state, str(body["client_id"]), list(body["companies"]))
    except (ValueError, KeyError, TypeError) as e:
        return Response.json(
            {"error": "invalid_request", "error_description": type(e).__name__}, 400
        )
    return Response.json({"ok": True})


def handle(state: FakeImsState, req: Request, path: str) -> Response:
    """Answer a request for one of :data:`PATHS`."""
    if path == "/discovery/me":
        return _me(state, req)
    return _control(state, req)
