"""Experience Platform and the products on its gateway: ``aep``, ``ajo`` (Journey Optimizer)
and ``cja`` (Customer Journey Analytics).

AEP and AJO route by sandbox (``x-sandbox-name``; IMS-side, an omitted header means ``prod``,
so the default is spelled out to make the choice visible). CJA takes the trio only.

AJO has two roots on the platform gateway: ``/ajo`` (journeys, content, campaigns) and
``/journey/orchestration`` (the Capping and Throttling APIs), published as its ``journey``
base URL.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from imsd.plugin import Product, TokenView, hookimpl

from ._conventions import PLATFORM_SCOPES, check_known, slug, trio, trio_env


class Sandboxed:
    """A platform product addressed per sandbox."""

    default_scopes = PLATFORM_SCOPES

    def __init__(self, name: str, base: str, more: Mapping[str, str] | None = None) -> None:
        self.name = name
        self._base = base
        self._more = dict(more or {})

    def validate_options(self, options: Mapping[str, Any]) -> Mapping[str, Any]:
        check_known(options, ("sandbox",))
        return {"sandbox": slug(options, "sandbox", default="prod")}

    def headers(self, view: TokenView) -> dict[str, str]:
        return {**trio(view), "x-sandbox-name": str(view.options["sandbox"])}

    def env(self, view: TokenView) -> dict[str, str]:
        return {**trio_env(view), "ADOBE_SANDBOX_NAME": str(view.options["sandbox"])}

    def base_url(self, options: Mapping[str, Any]) -> str | None:
        return self._base

    def base_urls(self, options: Mapping[str, Any]) -> dict[str, str]:
        return dict(self._more)


class Cja:
    name = "cja"
    default_scopes = PLATFORM_SCOPES
    _base = "https://cja.adobe.io"

    def validate_options(self, options: Mapping[str, Any]) -> Mapping[str, Any]:
        check_known(options, ())
        return {}

    def headers(self, view: TokenView) -> dict[str, str]:
        return trio(view)

    def env(self, view: TokenView) -> dict[str, str]:
        return trio_env(view)

    def base_url(self, options: Mapping[str, Any]) -> str | None:
        return self._base


@hookimpl
def imsd_products() -> list[Product]:
    return [
        Sandboxed("aep", "https://platform.adobe.io"),
        Sandboxed(
            "ajo",
            "https://platform.adobe.io/ajo",
            # Capping and Throttling APIs: {JO_HOST}/journey/orchestration, per
            # https://raw.githubusercontent.com/AdobeDocs/journey-optimizer-apis/main/src/swagger-specs/journeys.yaml
            # https://experienceleague.adobe.com/en/docs/journey-optimizer/using/connect-systems/external-systems/capping
            {"journey": "https://platform.adobe.io/journey/orchestration"},
        ),
        Cja(),
    ]
