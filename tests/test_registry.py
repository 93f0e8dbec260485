from __future__ import annotations

import importlib.metadata as md
import types
from collections.abc import Mapping
from typing import Any

import pytest
from imsd import registry
from imsd.plugin import Product, TokenView, hookimpl


class Extra:
    name = "extra"
    default_scopes: tuple[str, ...] = ("openid",)

    def validate_options(self, options: Mapping[str, Any]) -> Mapping[str, Any]:
        return dict(options)

    def headers(self, view: TokenView) -> dict[str, str]:
        return {"Authorization": f"Bearer {view.access_token}"}

    def env(self, view: TokenView) -> dict[str, str]:
        return {}

    def base_url(self, options: Mapping[str, Any]) -> str | None:
        return None


def plugin_module(name: str, **hooks: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        setattr(mod, hook_name, hookimpl(fn))
    return mod


def test_builtin_generic_loads_through_its_entry_point() -> None:
    reg = registry.load_registry()
    assert "generic" in reg.products
    info = next(p for p in reg.plugins if p.name == "generic")
    assert info.error is None
    assert info.products == ("generic",)
    assert info.source.endswith("imsd_plugins.generic")


def test_broken_entry_point_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    real = list(registry._entry_points())
    broken = md.EntryPoint(name="aaa-broken", value="imsd_no_such_module_xyz", group="imsd")
    monkeypatch.setattr(registry, "_entry_points", lambda: [broken, *real])
    reg = registry.load_registry()
    assert "generic" in reg.products
    [err] = reg.errors
    assert err.name == "aaa-broken"
    assert err.error is not None
    assert "ModuleNotFoundError" in err.error


def test_misspelled_hook_and_bad_product_are_rejected_others_kept() -> None:
    def imsd_product() -> list[Product]:  # misspelled: check_pending() must catch it
        return [Extra()]

    def imsd_products() -> list[object]:
        return [object()]

    def good_products() -> list[Product]:
        return [Extra()]

    reg = registry.load_registry(
        extra={
            "typo": plugin_module("typo", imsd_product=imsd_product),
            "notaproduct": plugin_module("notaproduct", imsd_products=imsd_products),
            "good": plugin_module("good", imsd_products=good_products),
        }
    )
    errors = {p.name: p.error for p in reg.errors}
    assert set(errors) == {"typo", "notaproduct"}
    assert "imsd_product" in (errors["typo"] or "")
    assert "Product protocol" in (errors["notaproduct"] or "")
    assert {"generic", "extra"} <= set(reg.products)


def test_duplicate_product_keeps_first() -> None:
    def dup() -> list[Product]:
        p = Extra()
        p.name = "generic"
        return [p]

    reg = registry.load_registry(extra={"dup": plugin_module("dup", imsd_products=dup)})
    assert type(reg.products["generic"]).__name__ == "Generic"
