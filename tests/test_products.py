"""The built-in products, through the registry exactly as the daemon loads them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from imsd.model import Credential, CredentialError, Secret
from imsd.plugin import TokenView
from imsd.registry import load_registry, validate_products

PRODUCTS = load_registry().products
ORG = "0123456789ABCDEF01234567@AdobeOrg"


def view(options: dict[str, Any]) -> TokenView:
    return TokenView("c", "TOKEN", "bearer", "client", ORG, 0.0, options)


def cred(products: tuple[str, ...], options: dict[str, dict[str, Any]]) -> Credential:
    return Credential(
        name="c",
        path=Path("/creds/c.toml"),
        auth="oauth_server_to_server",
        client_id="client",
        client_secret=Secret("s"),
        org_id=ORG,
        scopes=("openid",),
        products=products,
        product_options=options,
    )


TRIO = {"Authorization": "Bearer TOKEN", "x-api-key": "client", "x-gw-ims-org-id": ORG}


@pytest.mark.parametrize(
    ("product", "options", "headers", "base"),
    [
        ("generic", {}, TRIO, None),
        ("aep", {}, {**TRIO, "x-sandbox-name": "prod"}, "https://platform.adobe.io"),
        (
            "aep",
            {"sandbox": "dev-1"},
            {**TRIO, "x-sandbox-name": "dev-1"},
            "https://platform.adobe.io",
        ),
        ("ajo", {}, {**TRIO, "x-sandbox-name": "prod"}, "https://platform.adobe.io/ajo"),
        ("cja", {}, TRIO, "https://cja.adobe.io"),
        (
            "analytics",
            {"company_id": "acme0"},
            {**TRIO, "x-proxy-global-company-id": "acme0"},
            "https://analytics.adobe.io/api/acme0",
        ),
        (
            "analytics-1.4",
            {},
            {"Authorization": "Bearer TOKEN", "x-api-key": "client"},
            "https://api.omniture.com/admin/1.4/rest/",
        ),
        (
            "campaign",
            {"tenant": "acme"},
            {"Authorization": "Bearer TOKEN", "X-Api-Key": "client", "Cache-Control": "no-cache"},
            "https://mc.adobe.io/acme/campaign",
        ),
        (
            "campaign",
            {"tenant": "acme", "instance": "stage"},
            {"Authorization": "Bearer TOKEN", "X-Api-Key": "client", "Cache-Control": "no-cache"},
            "https://mc.adobe.io/acme-mkt-stage/campaign",
        ),
    ],
)
def test_headers_and_base_url(
    product: str, options: dict[str, Any], headers: dict[str, str], base: str | None
) -> None:
    p = PRODUCTS[product]
    normalized = p.validate_options(options)
    assert p.headers(view(dict(normalized))) == headers
    assert p.base_url(normalized) == base
    env = p.env(view(dict(normalized)))
    assert env["ADOBE_ACCESS_TOKEN"] == "TOKEN"
    assert env["ADOBE_API_KEY"] == "client"
    assert p.default_scopes


def test_retired_analytics_14_carries_a_notice() -> None:
    assert "2026-08-12" in PRODUCTS["analytics-1.4"].notice  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("products", "options", "field", "needle"),
    [
        (("analytics",), {}, "product.analytics", "'company_id' is required"),
        (
            ("campaign",),
            {"campaign": {"tenant": "acme", "instance": "dev"}},
            "product.campaign",
            "'instance'",
        ),
        (("campaign",), {}, "product.campaign", "'tenant' is required"),
        (("aep",), {"aep": {"sandbox": "bad name\r\nx: y"}}, "product.aep", "'sandbox'"),
        (("aep",), {"aep": {"sandbx": "dev"}}, "product.aep", "unknown option 'sandbx'"),
        (("nope",), {}, "products", "unknown product 'nope'"),
    ],
)
def test_option_errors_name_file_and_option(
    products: tuple[str, ...], options: dict[str, dict[str, Any]], field: str, needle: str
) -> None:
    with pytest.raises(CredentialError) as err:
        validate_products(cred(products, options), PRODUCTS)
    assert err.value.field == field
    assert str(err.value).startswith("/creds/c.toml: " + field)
    assert needle in str(err.value)


def test_validated_options_are_normalized() -> None:
    c = validate_products(cred(("aep", "cja"), {}), PRODUCTS)
    assert c.product_options == {"aep": {"sandbox": "prod"}, "cja": {}}
