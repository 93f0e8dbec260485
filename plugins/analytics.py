"""Adobe Analytics: the 2.0 API (``analytics``) and the retired 1.4 API (``analytics-1.4``).

2.0 is addressed by global company id, both in the base URL and (for the endpoints that need
it, which clients send everywhere) in ``x-proxy-global-company-id``. Without ``company_id``
the product discovers it with the token (``GET /discovery/me``): one company is used, several
are an error that lists them.

1.4 takes Bearer and ``x-api-key``, and ``X-ADOBE-DMA-COMPANY`` (the company's login name)
picks the company when the login has several. Adobe announced its end of life for
2026-08-12 (the Data Insertion API excepted), so the product carries a notice the daemon logs
when a credential uses it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import urlsplit

from imsd.plugin import (
    Discovery,
    HttpRequest,
    Product,
    TokenView,
    hookimpl,
    https_or_loopback,
)

from ._conventions import PLATFORM_SCOPES, check_known, slug, trio, trio_env

# https://developer.adobe.com/analytics-apis/docs/2.0/guides/endpoints/discovery/
# GET it with Bearer + x-api-key: {"imsOrgs": [{"imsOrgId", "companies": [{"globalCompanyId",
# "companyName", "apiRateLimitPolicy"}]}]}.
DISCOVERY_URL: Final = "https://analytics.adobe.io/discovery/me"
_SHOWN: Final = 10  # companies named in a "several companies" error


def _url_option(options: Mapping[str, Any], key: str) -> str:
    value = options[key]
    if not isinstance(value, str) or not value.isprintable() or not https_or_loopback(value):
        raise ValueError(f"option {key!r} must be an https URL (http only to loopback)")
    return value


def _shown(value: object) -> str:
    """A value from Adobe's answer, fit for a one-line error message."""
    text = str(value)
    return text[:64] if text.isprintable() else "?"


def _companies(answer: object, org_id: str) -> list[tuple[str, str]]:
    """(globalCompanyId, companyName) of the credential's org, or of every org listed when
    its org is not among them."""
    if not isinstance(answer, dict) or not isinstance(answer.get("imsOrgs"), list):
        raise ValueError("company discovery gave an answer without imsOrgs; set company_id")
    orgs = [o for o in answer["imsOrgs"] if isinstance(o, dict)]
    own = [o for o in orgs if o.get("imsOrgId") == org_id]
    out: dict[str, str] = {}
    for org in own or orgs:
        for company in org.get("companies") or ():
            if isinstance(company, dict) and isinstance(company.get("globalCompanyId"), str):
                out.setdefault(company["globalCompanyId"], str(company.get("companyName", "")))
    return list(out.items())


class Analytics:
    name = "analytics"
    default_scopes = PLATFORM_SCOPES

    def validate_options(self, options: Mapping[str, Any]) -> Mapping[str, Any]:
        check_known(options, ("company_id", "discovery_url"))
        out: dict[str, Any] = {}
        if "company_id" in options:
            out["company_id"] = slug(options, "company_id")
        if "discovery_url" in options:
            out["discovery_url"] = _url_option(options, "discovery_url")
        return out

    def headers(self, view: TokenView) -> dict[str, str]:
        return {**trio(view), "x-proxy-global-company-id": str(view.options["company_id"])}

    def env(self, view: TokenView) -> dict[str, str]:
        return {**trio_env(view), "ADOBE_COMPANY_ID": str(view.options["company_id"])}

    def base_url(self, options: Mapping[str, Any]) -> str:
        return f"https://analytics.adobe.io/api/{options['company_id']}"

    def discover(self, view: TokenView) -> Discovery | None:
        if "company_id" in view.options:
            return None
        return self._discover(view, str(view.options.get("discovery_url", DISCOVERY_URL)))

    def _discover(self, view: TokenView, url: str) -> Discovery:
        host = urlsplit(url).netloc
        answer = yield HttpRequest(
            "GET",
            url,
            headers={
                "Authorization": f"Bearer {view.access_token}",
                "x-api-key": view.client_id,
                "Accept": "application/json",
            },
        )
        if answer.status != 200:
            raise ValueError(
                f"company discovery ({host}) answered HTTP {answer.status}; "
                "check the credential's Analytics access or set company_id"
            )
        try:
            found = _companies(json.loads(answer.body), view.org_id)
        except json.JSONDecodeError:
            raise ValueError(f"company discovery ({host}) did not answer JSON") from None
        if not found:
            raise ValueError(
                "company discovery found no Analytics company for this credential "
                "(is it in an Analytics product profile?); set company_id"
            )
        if len(found) > 1:
            listed = ", ".join(f"{_shown(i)} ({_shown(n)})" for i, n in found[:_SHOWN])
            more = f" and {len(found) - _SHOWN} more" if len(found) > _SHOWN else ""
            raise ValueError(
                f"company discovery found {len(found)} companies: {listed}{more}; "
                "choose one with company_id"
            )
        return {"company_id": found[0][0]}


class Analytics14:
    name = "analytics-1.4"
    default_scopes = PLATFORM_SCOPES
    # https://developer.adobe.com/analytics-apis/docs/1.4/guides/eol (announcement);
    # https://experienceleague.adobe.com/en/docs/discontinued/using/analytics-1-4-apis says it
    # was retired effective 2026-08-31.
    notice: Final = (
        "Adobe announced the end of life of the Analytics 1.4 API and WSSE authentication "
        "for 2026-08-12 (its discontinued-features page gives 2026-08-31 as effective); "
        "the Data Insertion API is not affected; migrate to the 2.0 API (product 'analytics')"
    )
    _base = "https://api.omniture.com/admin/1.4/rest/"

    def validate_options(self, options: Mapping[str, Any]) -> Mapping[str, Any]:
        check_known(options, ("company",))
        if "company" not in options:
            return {}
        # The company's login name, as in the Analytics login ("Example Corp" is fine).
        value = options["company"]
        if (
            not isinstance(value, str)
            or not value.strip()
            or value != value.strip()
            or not value.isprintable()
            or len(value) > 255
        ):
            raise ValueError(
                "option 'company' must be the company's login name: one line, no surrounding spaces"
            )
        return {"company": value}

    def headers(self, view: TokenView) -> dict[str, str]:
        out = {"Authorization": f"Bearer {view.access_token}", "x-api-key": view.client_id}
        if "company" in view.options:
            # Picks the login company. https://github.com/AdobeDocs/analytics-1.4-apis
            # docs/authentication/auth_company.md; aanalytics2's LegacyAnalytics requires it.
            out["X-ADOBE-DMA-COMPANY"] = str(view.options["company"])
        return out

    def env(self, view: TokenView) -> dict[str, str]:
        env = trio_env(view)
        if "company" in view.options:
            env["ADOBE_DMA_COMPANY"] = str(view.options["company"])
        return env

    def base_url(self, options: Mapping[str, Any]) -> str | None:
        return self._base


@hookimpl
def imsd_products() -> list[Product]:
    return [Analytics(), Analytics14()]
