"""Hook specifications of the ``imsd`` pluggy project (API version 1)."""

from __future__ import annotations

from imsd.plugin import Product, hookspec


@hookspec
def imsd_products() -> list[Product]:  # type: ignore[empty-body]
    """Return the products this plugin provides.

    Called once at start-up and on reload. Each product's ``name`` must be unique across all
    plugins; a duplicate is reported and the later one is skipped.

    .. versionadded:: 0.1
    """
