"""The built-in products, through the registry exactly as the daemon loads them."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from imsd.model import Credential, CredentialError, Grant, Secret
from imsd.plugin import TokenView
from imsd.registry import load_registry, scope_hints, validate_products
from imsd.render import document, product_env, product_headers, product_urls

PRODUCTS = load_registry().products
ORG = "0123456789ABCDEF01234567@AdobeOrg"
GRANT = Grant(Secret("TOKEN"), "bearer", 1_800_000_000.0, 1_800_086_400.0)


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
        (
            ("analytics",),
            {"analytics": {"discovery_url": "http://example.com/discovery/me"}},
            "product.analytics",
            "'discovery_url' must be an https URL",
        ),
        (
            ("analytics-1.4",),
            {"analytics-1.4": {"company": " Acme\r\nx: y"}},
            "product.analytics-1.4",
            "'company' must be the company's login name",
        ),
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


# -- base URLs, company selection, scope hints -------------------------------------------------

JOURNEY = "https://platform.adobe.io/journey/orchestration"


@pytest.mark.parametrize(
    ("product", "options", "base", "named"),
    [
        ("generic", {}, None, {}),
        ("aep", {}, "https://platform.adobe.io", {}),
        # Capping and Throttling live under /journey/orchestration, not /ajo.
        ("ajo", {}, "https://platform.adobe.io/ajo", {"journey": JOURNEY}),
        ("cja", {}, "https://cja.adobe.io", {}),
        ("analytics", {"company_id": "acme0"}, "https://analytics.adobe.io/api/acme0", {}),
        ("analytics-1.4", {}, "https://api.omniture.com/admin/1.4/rest/", {}),
        ("campaign", {"tenant": "acme"}, "https://mc.adobe.io/acme/campaign", {}),
    ],
)
def test_base_urls_reach_env_json_and_socket_answer(
    product: str, options: dict[str, Any], base: str | None, named: dict[str, str]
) -> None:
    c = validate_products(cred((product,), {product: options}), PRODUCTS)
    assert product_urls(c, PRODUCTS[product]) == (base, named)
    env = product_env(c, GRANT, PRODUCTS[product])
    assert env.get("ADOBE_BASE_URL") == base
    assert env.get("ADOBE_JOURNEY_BASE_URL") == named.get("journey")
    entry = document(c, GRANT, PRODUCTS)["instances"][product]
    assert entry["type"] == product
    assert (entry["base_url"], entry["base_urls"]) == (base, named)
    assert entry["headers"] == document(c, GRANT, PRODUCTS)["headers"][product]


def test_analytics_14_company_header() -> None:
    c = validate_products(
        cred(("analytics-1.4",), {"analytics-1.4": {"company": "Example Corp"}}), PRODUCTS
    )
    p = PRODUCTS["analytics-1.4"]
    assert product_headers(c, GRANT, p)["X-ADOBE-DMA-COMPANY"] == "Example Corp"
    assert product_env(c, GRANT, p)["ADOBE_DMA_COMPANY"] == "Example Corp"
    # Without it, one company per login: nothing is sent.
    plain = validate_products(cred(("analytics-1.4",), {}), PRODUCTS)
    assert "X-ADOBE-DMA-COMPANY" not in product_headers(plain, GRANT, p)


def test_analytics_14_notice_says_what_adobe_announced() -> None:
    notice = PRODUCTS["analytics-1.4"].notice  # type: ignore[attr-defined]
    for fact in ("2026-08-12", "2026-08-31", "WSSE", "Data Insertion", "'analytics'"):
        assert fact in notice


def test_analytics_without_company_id_asks_for_discovery() -> None:
    p = PRODUCTS["analytics"]
    assert p.discover(view({"company_id": "acme0"})) is None  # type: ignore[attr-defined]
    flow = p.discover(view({}))  # type: ignore[attr-defined]
    request = next(flow)
    assert (request.method, request.url) == ("GET", "https://analytics.adobe.io/discovery/me")
    assert request.headers["Authorization"] == "Bearer TOKEN"
    assert request.headers["x-api-key"] == "client"
    flow.close()


def test_scope_hints_name_missing_default_scopes() -> None:
    c = cred(("aep", "campaign"), {"campaign": {"tenant": "acme"}})
    hints = scope_hints(c, PRODUCTS)
    assert len(hints) == 2
    assert hints[0].startswith("c: product 'aep' usually needs scopes AdobeID, read_organizations")
    assert "campaign_sdk" in hints[1]
    full = replace(c, scopes=PRODUCTS["aep"].default_scopes + PRODUCTS["campaign"].default_scopes)
    assert scope_hints(full, PRODUCTS) == []


def test_check_and_import_print_scope_hints(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    imported = imsd(
        "import",
        str(Path(__file__).parent / "fixtures" / "console" / "oauth-s2s.json"),
        "--name",
        "camp",
        "--product",
        "campaign",
        "--option",
        "campaign.tenant=acme",
        "--credentials-dir",
        str(creds),
    )
    assert imported.returncode == 0, imported.stderr
    assert "note: camp: product 'campaign' usually needs scopes campaign_sdk" in imported.stdout
    checked = imsd("check", "--credentials-dir", str(creds), "--strict")
    assert checked.returncode == 0, checked.stderr  # a hint is not a warning
    assert "note: camp: product 'campaign' usually needs scopes" in checked.stdout


def imsd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imsd", *args], capture_output=True, text=True, timeout=60
    )
