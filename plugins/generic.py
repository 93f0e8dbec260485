"""The ``generic`` product: the Experience Platform-family trio of headers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from imsd.plugin import Product, TokenView, hookimpl

from ._conventions import PLATFORM_SCOPES, check_known, trio, trio_env


class Generic:
    name = "generic"
    default_scopes = PLATFORM_SCOPES

    def validate_options(self, options: Mapping[str, Any]) -> Mapping[str, Any]:
        check_known(options, ())
        return {}

    def headers(self, view: TokenView) -> dict[str, str]:
        return trio(view)

    def env(self, view: TokenView) -> dict[str, str]:
        return trio_env(view)

    def base_url(self, options: Mapping[str, Any]) -> str | None:
        return None


@hookimpl
def imsd_products() -> list[Product]:
    return [Generic()]
