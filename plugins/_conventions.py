"""Conventions shared by the built-in products: option checking and the Experience Platform
trio of headers. Built only on the public plugin API, like a third party's plugin would be."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

from imsd.plugin import TokenView

#: The scope set of the Developer Console's OAuth Server-to-Server "Try it" credential.
PLATFORM_SCOPES: Final[tuple[str, ...]] = (
    "openid",
    "AdobeID",
    "read_organizations",
    "additional_info.projectedProductContext",
    "session",
)

_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


def check_known(options: Mapping[str, Any], known: Iterable[str]) -> None:
    unknown = sorted(set(options) - set(known))
    if unknown:
        allowed = ", ".join(sorted(known)) or "none"
        raise ValueError(f"unknown option {unknown[0]!r} (allowed: {allowed})")


def slug(options: Mapping[str, Any], key: str, *, default: str | None = None) -> str:
    """A required (or defaulted) identifier-like string option, safe in a header or a URL."""
    value = options.get(key, default)
    if value is None:
        raise ValueError(f"option {key!r} is required")
    if not isinstance(value, str) or not _SLUG.fullmatch(value):
        raise ValueError(f"option {key!r} must be letters, digits, '-' or '_'")
    return value


def trio(view: TokenView) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {view.access_token}",
        "x-api-key": view.client_id,
        "x-gw-ims-org-id": view.org_id,
    }


def trio_env(view: TokenView) -> dict[str, str]:
    return {
        "ADOBE_ACCESS_TOKEN": view.access_token,
        "ADOBE_API_KEY": view.client_id,
        "ADOBE_ORG_ID": view.org_id,
    }
