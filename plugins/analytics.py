"""Adobe Analytics: the 2.0 API (``analytics``) and the retired 1.4 API (``analytics-1.4``).

2.0 is addressed by global company id, both in the base URL and (for the endpoints that need
it, which clients send everywhere) in ``x-proxy-global-company-id``. 1.4 takes Bearer and
``x-api-key`` only; Adobe retired it on 2026-08-12 except for the Data Insertion API, so the
product carries a notice the daemon logs when a credential uses it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from imsd.plugin import Product, TokenView, hookimpl

from ._conventions import PLATFORM_SCOPES, check_known, slug, trio, trio_env


class Analytics:
    name = "analytics"
    default_scopes = PLATFORM_SCOPES

    def validate_options(self, options: Mapping[str, Any]) -> Mapping[str, Any]:
        check_known(options, ("company_id",))
        return {"company_id": slug(options, "company_id")}

    def headers(self, view: TokenView) -> dict[str, str]:
        return {**trio(view), "x-proxy-global-company-id": str(view.options["company_id"])}

    def env(self, view: TokenView) -> dict[str, str]:
        return {
            **trio_env(view),
            "ADOBE_COMPANY_ID": str(view.options["company_id"]),
            "ADOBE_BASE_URL": self.base_url(view.options),
        }

    def base_url(self, options: Mapping[str, Any]) -> str:
        return f"https://analytics.adobe.io/api/{options['company_id']}"


class Analytics14:
    name = "analytics-1.4"
    default_scopes = PLATFORM_SCOPES
    notice: Final = (
        "the Analytics 1.4 API was retired on 2026-08-12 except the Data Insertion API; "
        "migrate to the 2.0 API (product 'analytics')"
    )
    _base = "https://api.omniture.com/admin/1.4/rest/"

    def validate_options(self, options: Mapping[str, Any]) -> Mapping[str, Any]:
        check_known(options, ())
        return {}

    def headers(self, view: TokenView) -> dict[str, str]:
        return {"Authorization": f"Bearer {view.access_token}", "x-api-key": view.client_id}

    def env(self, view: TokenView) -> dict[str, str]:
        return {**trio_env(view), "ADOBE_BASE_URL": self._base}

    def base_url(self, options: Mapping[str, Any]) -> str | None:
        return self._base


@hookimpl
def imsd_products() -> list[Product]:
    return [Analytics(), Analytics14()]
