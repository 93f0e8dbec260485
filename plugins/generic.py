"""The ``generic`` product: the Experience Platform-family trio of headers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from imsd.plugin import Product, TokenView, hookimpl

DEFAULT_SCOPES = (
    "openid",
    "AdobeID",
    "read_organizations",
    "additional_info.projectedProductContext",
    "session",
)


class Generic:
    name = "generic"
    default_scopes = DEFAULT_SCOPES

    def validate_options(self, options: Mapping[str, Any]) -> Mapping[str, Any]:
        if options:
            raise ValueError(f"takes no options (got {', '.join(sorted(options))})")
        return {}

    def headers(self, view: TokenView) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {view.access_token}",
            "x-api-key": view.client_id,
            "x-gw-ims-org-id": view.org_id,
        }

    def env(self, view: TokenView) -> dict[str, str]:
        return {
            "ADOBE_ACCESS_TOKEN": view.access_token,
            "ADOBE_API_KEY": view.client_id,
            "ADOBE_ORG_ID": view.org_id,
        }

    def base_url(self, options: Mapping[str, Any]) -> str | None:
        return None


@hookimpl
def imsd_products() -> list[Product]:
    return [Generic()]
