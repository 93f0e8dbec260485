"""The fake API gateway: ``/gateway/PRODUCT/<the real API's path>`` checks a request the way
Adobe documents its gateways check it, and answers in the documented error shapes.

Where the rules come from: Adobe's product documentation, cited per product in
:data:`PRODUCTS` (never the product plugins, whose rendered headers the tests feed in). What
every product shares (Adobe I/O gateway, documented in the Experience Platform troubleshooting
guide, https://experienceleague.adobe.com/en/docs/experience-platform/landing/troubleshooting#request-header-errors):

- no ``Authorization``: 403 ``{"error_code": "403010", "message": "Oauth token is missing."}``
- a token that is not one of this fake's live tokens: 401 ``401013 Oauth token is not valid``
- no ``x-api-key``: 403 ``403000 Api Key is required``; one that is not the token's
  ``client_id``: 403 ``403003 Api Key is invalid``
- a required org header missing: 400 ``400003 Missing header``; naming another org than the
  client's, or a token without the product's entitlement: 403 ``403025 Profile is not valid``

Entitlement: a token reaches a product only through its product context (``prodCtx``: the
Campaign troubleshooting page says the request is routed by it; the Analytics curl guide shows
it with ``serviceCode`` and ``global_company_id``), which IMS projects when the token was
minted with ``additional_info.projectedProductContext``, a scope every product's documented
scope set has. So a token without that scope (say, ``openid`` alone) is refused by every
product, as is a client whose :class:`~imsd.fakeims.state.Profile` lacks the product. (That
the gateway answers "Profile is not valid" for the missing scope is inferred from those pages.)

Guesses (nothing published): the status and shape for an unknown sandbox, an Analytics
company the client cannot see, an Analytics request naming no company, and an unknown
``/gateway/PRODUCT``. Each is marked ``GUESS`` below.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Final

from imsd.fakeims import discovery
from imsd.fakeims.state import Client, FakeImsState
from imsd.httpserver import Request, Response

__all__ = ["ENTITLEMENT_SCOPE", "PRODUCTS", "ProductRule", "handle"]

#: The scope that makes IMS project the client's product profiles into the token.
ENTITLEMENT_SCOPE: Final = "additional_info.projectedProductContext"


@dataclass(frozen=True, slots=True)
class ProductRule:
    """What the documentation says one product's gateway wants beyond Bearer + x-api-key."""

    doc: str  # where the rule comes from
    profile: str | None  # the product profile the client needs (None: any product)
    org_header: str | None = "x-gw-ims-org-id"  # required, and must be the client's org
    sandboxed: bool = False  # x-sandbox-name optional (absent: prod), must exist if given
    company: bool = False  # Analytics 2.0: /api/{globalCompanyId}/... or the proxy header,
    # one of the companies the fake discovery lists for the client
    tenant: bool = False  # Campaign: /{tenant}/campaign/...
    profile_code: str = "403025"  # the "Profile is not valid" code this gateway answers


_PLATFORM_GUIDE: Final = (
    "https://experienceleague.adobe.com/en/docs/experience-platform/landing/platform-apis/api-guide"
)

PRODUCTS: Final[dict[str, ProductRule]] = {
    # Any Experience Cloud API behind the gateway, with the Platform trio of headers.
    "generic": ProductRule(
        doc="https://experienceleague.adobe.com/en/docs/experience-platform/landing/troubleshooting",
        profile=None,
    ),
    # "Authorization, x-api-key, x-gw-ims-org-id"; "x-sandbox-name: {SANDBOX_NAME}" and
    # "If the x-sandbox-name header is not specified, requests are resolved under the prod
    # sandbox." (AdobeDocs/experience-platform.en help/landing/api-guide.md, and the Flow
    # Service guides' note.)
    "aep": ProductRule(doc=_PLATFORM_GUIDE, profile="aep", sandboxed=True),
    # AdobeDocs/journey-optimizer-apis src/pages/references/authentication.md: Authorization,
    # X-Api-Key, x-gw-ims-org-id (its Cache-Control and Content-Type are sample headers, not
    # checks). Its APIs sit on platform.adobe.io, so the sandbox rule is AEP's (inferred: its
    # OpenAPI specs list x-sandbox-name per call, its auth page does not require it).
    "ajo": ProductRule(
        doc="https://developer.adobe.com/journey-optimizer-apis/references/authentication/",
        profile="ajo",
        sandboxed=True,
    ),
    # AdobeDocs/cja-apis src/pages/credential/index.md: Authorization, x-api-key,
    # x-gw-ims-org-id; 403 "check ... the value for the x-gw-ims-org-id header", other errors
    # per the Platform troubleshooting guide.
    "cja": ProductRule(doc="https://developer.adobe.com/cja-apis/docs/credential/", profile="cja"),
    # AdobeDocs/analytics-2.0-apis guides/use-cases/curl.md: GET
    # https://analytics.adobe.io/api/{GLOBAL_COMPANY_ID}/users/me with x-api-key and
    # Authorization only (no org header); classifications/import-file.md: "If you receive ...
    # 'Cannot find proper global company ID,' add ... x-proxy-global-company-id". Without a
    # product profile: 403025 (Obs.: pitchmuc/adobe-analytics-api-2.0#13).
    "analytics": ProductRule(
        doc="https://developer.adobe.com/analytics-apis/docs/2.0/guides/use-cases/curl/",
        profile="analytics",
        org_header=None,
        company=True,
    ),
    # AdobeDocs/analytics-1.4-apis guides/admin/report-suite/get.md: x-api-key and
    # Authorization: Bearer. (X-ADOBE-DMA-COMPANY picks among several companies; optional.)
    "analytics-1.4": ProductRule(
        doc="https://developer.adobe.com/analytics-apis/docs/1.4/guides/admin/report-suite/get/",
        profile="analytics",
        org_header=None,
    ),
    # Campaign Standard "Setting up API access": GET https://mc.adobe.io/<ORGANIZATION>/campaign/
    # ... with Authorization and X-Api-Key (Cache-Control: no-cache is in the samples; nothing
    # says the gateway checks it). "Troubleshooting": {"error_code":"403023","message":"Profile
    # is not valid"} when the token has no prodCtx for the <ORGANIZATION> (tenant) in the URL.
    # https://experienceleague.adobe.com/en/docs/campaign-standard/using/working-with-apis/troubleshooting
    "campaign": ProductRule(
        doc="https://experienceleague.adobe.com/en/docs/campaign-standard/using/working-with-apis/setting-up-api-access",
        profile="campaign",
        org_header=None,
        tenant=True,
        profile_code="403023",
    ),
}


def _io_error(status: int, code: str, message: str) -> Response:
    """The Adobe I/O gateway's documented error body."""
    return Response.json({"error_code": code, "message": message}, status=status)


def _platform_problem(status: int, title: str, detail: str) -> Response:
    """Experience Platform's service error body (the troubleshooting guide's content-type
    example: ``type``, ``status``, ``title``, ``detail``)."""
    body = {"type": "/placeholder/type/uri", "status": status, "title": title, "detail": detail}
    return Response.json(body, status=status)


def _analytics_error(status: int, code: str, description: str) -> Response:
    """Analytics' own error body (Obs.: analytics-2.0-apis issues #134 and #232)."""
    body = {"errorCode": code, "errorDescription": description, "errorId": str(uuid.uuid4())}
    return Response.json(body, status=status)


def _entitled(claims: dict[str, Any], client: Client, rule: ProductRule) -> bool:
    scopes = {s.strip() for s in str(claims.get("scope", "")).split(",")}
    if ENTITLEMENT_SCOPE not in scopes:
        return False
    products = client.profile.products
    return bool(products) if rule.profile is None else rule.profile in products


def _company(req: Request, rest: list[str]) -> str | None:
    """The global company id a request names: the path's /api/{id}/..., else the header."""
    if len(rest) >= 2 and rest[0] == "api" and rest[1]:
        return rest[1]
    return req.header("x-proxy-global-company-id") or None


def _check_product(
    state: FakeImsState, req: Request, rule: ProductRule, client: Client, rest: list[str]
) -> tuple[Response | None, dict[str, str]]:
    """The product-specific checks: an error, or what the request addressed."""
    seen: dict[str, str] = {}
    profile = client.profile
    if rule.sandboxed:
        sandbox = req.header("x-sandbox-name") or "prod"
        if sandbox not in profile.sandboxes:
            # GUESS: the status and body for a sandbox the org does not have.
            return _platform_problem(
                403, "Forbidden", f"sandbox {sandbox[:64]!r} is not available"
            ), seen
        seen["x-sandbox-name"] = sandbox
    if rule.company:
        company = _company(req, rest)
        if company is None:
            # The message is documented (classifications/import-file.md); GUESS: status.
            return _analytics_error(400, "400", "Cannot find proper global company ID"), seen
        visible = {c["globalCompanyId"] for c in discovery.companies_of(state, client.client_id)}
        if company not in visible:
            # GUESS: status and code for a company the client cannot see.
            return _analytics_error(
                403, "403", f"company {company[:64]!r} is not available to this client"
            ), seen
        seen["company"] = company
        if proxy := req.header("x-proxy-global-company-id"):
            seen["x-proxy-global-company-id"] = proxy
    if rule.tenant:
        tenant = rest[0] if rest else ""
        if tenant not in profile.tenants:
            return _io_error(403, rule.profile_code, "Profile is not valid"), seen
        seen["tenant"] = tenant
    return None, seen


def handle(state: FakeImsState, req: Request, path: str) -> Response:
    """Answer ``/gateway/PRODUCT/...``."""
    parts = path.split("/")  # "", "gateway", PRODUCT, the real API's path...
    product, rest = parts[2] if len(parts) > 2 else "", parts[3:]
    rule = PRODUCTS.get(product)
    if rule is None:
        return _io_error(404, "404000", f"no such API: {product[:64]}")  # GUESS
    auth = req.header("authorization")
    if not auth:
        return _io_error(403, "403010", "Oauth token is missing.")
    claims = state.validate_token(auth[7:].strip()) if auth[:7].lower() == "bearer " else None
    if claims is None or claims.get("type") != "access_token":
        return _io_error(401, "401013", "Oauth token is not valid")
    api_key = req.header("x-api-key")
    if not api_key:
        return _io_error(403, "403000", "Api Key is required")
    if api_key != claims.get("client_id"):
        return _io_error(403, "403003", "Api Key is invalid")
    client = state.client(str(claims["client_id"]))
    if client is None:  # deleted since the token was minted
        return _io_error(401, "401013", "Oauth token is not valid")
    if rule.org_header is not None:
        org = req.header(rule.org_header)
        if not org:
            return _io_error(400, "400003", "Missing header")
        if org != client.org_id:
            return _io_error(403, rule.profile_code, "Profile is not valid")
    if not _entitled(claims, client, rule):
        return _io_error(403, rule.profile_code, "Profile is not valid")
    error, seen = _check_product(state, req, rule, client, rest)
    if error is not None:
        return error
    return Response.json({"ok": True, "product": product, "client_id": client.client_id, **seen})
