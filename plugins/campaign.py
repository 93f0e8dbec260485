"""Adobe Campaign Standard: the tenant lives in the URL (``mc.adobe.io/{tenant}/campaign``),
its stage instance under ``{tenant}-mkt-stage``; the gateway wants ``X-Api-Key`` and
``Cache-Control: no-cache``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from imsd.plugin import Product, TokenView, hookimpl

from ._conventions import check_known, slug, trio_env

SCOPES: Final[tuple[str, ...]] = (
    "openid",
    "AdobeID",
    "campaign_sdk",
    "additional_info.projectedProductContext",
    "campaign_config_server_general",
    "deliverability_service_general",
)


class Campaign:
    name = "campaign"
    default_scopes = SCOPES

    def validate_options(self, options: Mapping[str, Any]) -> Mapping[str, Any]:
        check_known(options, ("tenant", "instance"))
        instance = options.get("instance", "prod")
        if instance not in ("prod", "stage"):
            raise ValueError("option 'instance' must be 'prod' or 'stage'")
        return {"tenant": slug(options, "tenant"), "instance": instance}

    def headers(self, view: TokenView) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {view.access_token}",
            "X-Api-Key": view.client_id,
            "Cache-Control": "no-cache",
        }

    def env(self, view: TokenView) -> dict[str, str]:
        return {**trio_env(view), "ADOBE_CAMPAIGN_TENANT": str(view.options["tenant"])}

    def base_url(self, options: Mapping[str, Any]) -> str:
        tenant = str(options["tenant"])
        if options.get("instance") == "stage":
            tenant += "-mkt-stage"
        return f"https://mc.adobe.io/{tenant}/campaign"


@hookimpl
def imsd_products() -> list[Product]:
    return [Campaign()]
