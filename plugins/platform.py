"""Experience Platform and the products on its gateway: ``aep``, ``ajo`` (Journey Optimizer)
and ``cja`` (Customer Journey Analytics).

AEP and AJO route by sandbox (``x-sandbox-name``; IMS-side, an omitted header means ``prod``,
so the default is spelled out to make the choice visible). CJA takes the trio only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from imsd.plugin import Product, TokenView, hookimpl

from ._conventions import PLATFORM_SCOPES, check_known, slug, trio, trio_env


class Sandboxed:
    """A platform product addressed per sandbox."""

    default_scopes = PLATFORM_SCOPES

    def __init__(self, name: str, base: str) -> None:
        self.name = name
        self._base = base

    def validate_options(self, options: Mapping[str, Any]) -> Mapping[str, Any]:
        check_known(options, ("sandbox",))
        return {"sandbox": slug(options, "sandbox", default="prod")}

    def headers(self, view: TokenView) -> dict[str, str]:
        return {**trio(view), "x-sandbox-name": str(view.options["sandbox"])}

    def env(self, view: TokenView) -> dict[str, str]:
        return {
            **trio_env(view),
            "ADOBE_SANDBOX_NAME": str(view.options["sandbox"]),
            "ADOBE_BASE_URL": self._base,
        }

    def base_url(self, options: Mapping[str, Any]) -> str | None:
        return self._base


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
        return {**trio_env(view), "ADOBE_BASE_URL": self._base}

    def base_url(self, options: Mapping[str, Any]) -> str | None:
        return self._base


@hookimpl
def imsd_products() -> list[Product]:
    return [
        Sandboxed("aep", "https://platform.adobe.io"),
        Sandboxed("ajo", "https://platform.adobe.io/ajo"),
        Cja(),
    ]
