"""The fake API gateway (``imsd.fakeims.gateway``) over real HTTP: each documented check, and
every built-in product's rendered headers against it.

The gateway's expectations come from its own table of Adobe's documentation
(``gateway.PRODUCTS``); the daemon's come from the product plugins. The end-to-end test feeds
the second to the first, so the two are checked against each other, not against themselves.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from imsd.fakeims import discovery
from imsd.fakeims.gateway import ENTITLEMENT_SCOPE, PRODUCTS
from imsd.fakeims.server import FakeIms
from imsd.fakeims.state import Profile

from tests.support import ORG, SECRET, make_settings

OTHER_ORG = "FEDCBA9876543210FEDCBA98@AdobeOrg"
#: The Platform / Analytics / CJA documented scope set (Experience League, AEP authentication).
DOC_SCOPES = ["openid", "AdobeID", "read_organizations", ENTITLEMENT_SCOPE, "session"]
PROFILE = Profile(sandboxes=frozenset({"prod", "dev"}), tenants=frozenset({"acme"}))


@pytest.fixture
def fake() -> Iterator[FakeIms]:
    # Not conftest's: clients with a product profile (a tenant), an Analytics company and the
    # documented scopes, plus one in AEP only.
    with FakeIms.in_thread() as f:
        f.state.add_client(
            "acme-client", secrets=[SECRET], scopes=DOC_SCOPES, org_id=ORG, profile=PROFILE
        )
        discovery.set_companies(f.state, "acme-client", [{"globalCompanyId": "acmecorp0"}])
        f.state.add_client(
            "aep-only",
            secrets=[SECRET],
            scopes=DOC_SCOPES,
            org_id=ORG,
            profile=Profile(products=frozenset({"aep"})),
        )
        yield f


@pytest.fixture
def client(fake: FakeIms) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.url, timeout=10) as c:
        yield c


def token(client: httpx.Client, scope: str = ",".join(DOC_SCOPES), cid: str = "acme-client") -> str:
    form = {"grant_type": "client_credentials", "client_id": cid, "client_secret": SECRET}
    r = client.post("/ims/token/v3", data={**form, "scope": scope})
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])


def trio(bearer: str, cid: str = "acme-client") -> dict[str, str]:
    return {"Authorization": f"Bearer {bearer}", "x-api-key": cid, "x-gw-ims-org-id": ORG}


#: A request each product's documentation shows: (gateway path, headers beyond Bearer +
#: x-api-key). Campaign and Analytics 2.0 name their tenant / company in the path.
DOCUMENTED = {
    "generic": ("/gateway/generic/some/api", {"x-gw-ims-org-id": ORG}),
    "aep": ("/gateway/aep/data/foundation/catalog/datasets", {"x-gw-ims-org-id": ORG}),
    "ajo": ("/gateway/ajo/ajo/journeys", {"x-gw-ims-org-id": ORG}),
    "cja": ("/gateway/cja/data/dataviews", {"x-gw-ims-org-id": ORG}),
    "analytics": ("/gateway/analytics/api/acmecorp0/users/me", {}),
    "analytics-1.4": ("/gateway/analytics-1.4/admin/1.4/rest/", {}),
    "campaign": ("/gateway/campaign/acme/campaign/profileAndServices/profile", {}),
}


def send(client: httpx.Client, product: str, bearer: str, **change: str | None) -> httpx.Response:
    path, extra = DOCUMENTED[product]
    headers: dict[str, str | None] = {
        "Authorization": f"Bearer {bearer}",
        "x-api-key": "acme-client",
        **extra,
        **{k.replace("_", "-"): v for k, v in change.items()},
    }
    return client.get(path, headers={k: v for k, v in headers.items() if v is not None})


def test_the_table_covers_every_builtin_product() -> None:
    from imsd.registry import load_registry

    assert set(PRODUCTS) == set(DOCUMENTED) == set(load_registry().products)


@pytest.mark.parametrize("product", sorted(DOCUMENTED))
def test_the_documented_request_passes_with_only_the_documented_headers(
    client: httpx.Client, product: str
) -> None:
    """No Cache-Control for Campaign, no sandbox for AEP/AJO, no org header for Analytics."""
    r = send(client, product, token(client))
    assert r.status_code == 200, r.text
    assert r.json()["ok"] is True


@pytest.mark.parametrize(
    ("product", "change", "status", "body"),
    [
        # Adobe I/O gateway, documented (Platform troubleshooting guide).
        ("generic", {"Authorization": None}, 403, {"error_code": "403010"}),
        ("generic", {"Authorization": "Bearer forged.token.sig"}, 401, {"error_code": "401013"}),
        ("generic", {"x-api-key": None}, 403, {"error_code": "403000"}),
        ("generic", {"x-api-key": "client-b"}, 403, {"error_code": "403003"}),
        ("campaign", {"x-api-key": "someone-else"}, 403, {"error_code": "403003"}),
        ("generic", {"x-gw-ims-org-id": None}, 400, {"error_code": "400003"}),
        ("aep", {"x-gw-ims-org-id": OTHER_ORG}, 403, {"error_code": "403025"}),
        ("cja", {"x-gw-ims-org-id": OTHER_ORG}, 403, {"error_code": "403025"}),
        ("ajo", {"x-gw-ims-org-id": None}, 400, {"error_code": "400003"}),
        # Sandboxes: absent means prod; one the org lacks is refused (shape guessed).
        ("aep", {"x-sandbox-name": "dev"}, 200, {"x-sandbox-name": "dev"}),
        ("aep", {}, 200, {"x-sandbox-name": "prod"}),
        ("aep", {"x-sandbox-name": "staging"}, 403, {"status": 403}),
        ("ajo", {"x-sandbox-name": "nope"}, 403, {"status": 403}),
    ],
)
def test_gateway_checks(
    client: httpx.Client,
    product: str,
    change: dict[str, str | None],
    status: int,
    body: dict[str, object],
) -> None:
    path, extra = DOCUMENTED[product]
    headers: dict[str, str | None] = {**trio(token(client)), **extra, **change}
    r = client.get(path, headers={k: v for k, v in headers.items() if v is not None})
    assert r.status_code == status, r.text
    assert body.items() <= r.json().items()


def test_analytics_company_must_be_one_the_client_sees(client: httpx.Client) -> None:
    bearer = token(client)
    base = {"Authorization": f"Bearer {bearer}", "x-api-key": "acme-client"}
    ok = client.get("/gateway/analytics/api/acmecorp0/reports", headers=base)
    assert (ok.status_code, ok.json()["company"]) == (200, "acmecorp0")
    unseen = client.get("/gateway/analytics/api/othercorp0/reports", headers=base)
    assert unseen.status_code == 403
    assert {"errorCode", "errorDescription", "errorId"} <= set(unseen.json())
    by_header = {**base, "x-proxy-global-company-id": "acmecorp0"}
    assert client.get("/gateway/analytics/classifications", headers=by_header).status_code == 200
    none = client.get("/gateway/analytics/classifications", headers=base)
    assert none.status_code == 400
    assert none.json()["errorDescription"] == "Cannot find proper global company ID"


def test_campaign_tenant_must_exist(client: httpx.Client) -> None:
    base = {"Authorization": f"Bearer {token(client)}", "x-api-key": "acme-client"}
    r = client.get("/gateway/campaign/otherco/campaign/profileAndServices/profile", headers=base)
    assert r.status_code == 403
    assert r.json() == {"error_code": "403023", "message": "Profile is not valid"}


@pytest.mark.parametrize("product", sorted(DOCUMENTED))
def test_an_openid_only_token_is_refused_by_every_product(
    client: httpx.Client, product: str
) -> None:
    r = send(client, product, token(client, scope="openid"))
    assert r.status_code == 403, r.text
    assert r.json()["message"] == "Profile is not valid"


def test_a_client_outside_a_products_profile_is_refused(client: httpx.Client) -> None:
    bearer = token(client, cid="aep-only")
    path, _ = DOCUMENTED["aep"]
    assert client.get(path, headers=trio(bearer, "aep-only")).status_code == 200
    r = client.get(DOCUMENTED["cja"][0], headers=trio(bearer, "aep-only"))
    assert (r.status_code, r.json()["error_code"]) == (403, "403025")


def test_a_refresh_token_is_not_a_bearer_token(client: httpx.Client, fake: FakeIms) -> None:
    refresh = fake.state.login("acme-client", DOC_SCOPES)
    r = client.get(DOCUMENTED["cja"][0], headers=trio(refresh))
    assert (r.status_code, r.json()["error_code"]) == (401, "401013")


def test_unknown_product(client: httpx.Client) -> None:
    r = client.get("/gateway/nope/x", headers=trio(token(client)))
    assert r.status_code == 404


def test_profile_over_http(client: httpx.Client) -> None:
    """Another process registers a client with its product profile."""
    r = client.post(
        "/_fake/clients",
        json={
            "client_id": "remote",
            "secrets": [SECRET],
            "scopes": DOC_SCOPES,
            "org_id": ORG,
            "profile": {"products": ["campaign"], "tenants": ["remoteco"]},
        },
    )
    assert r.json() == {"ok": True}
    base = {"Authorization": f"Bearer {token(client, cid='remote')}", "x-api-key": "remote"}
    assert client.get("/gateway/campaign/remoteco/campaign/x", headers=base).status_code == 200
    assert client.get("/gateway/campaign/acme/campaign/x", headers=base).status_code == 403
    bad = {"client_id": "x", "secrets": ["s"], "scopes": [], "org_id": ORG}
    profiles: list[dict[str, object]] = [{"a": []}, {"tenants": "acme"}]
    for profile in profiles:
        r = client.post("/_fake/clients", json={**bad, "profile": profile})
        assert r.status_code == 400, profile


# -- every built-in product, as the daemon renders it ----------------------------------------

ALL_PRODUCTS = """products = ["generic", "aep", "ajo", "cja", "analytics", "analytics-1.4",
            "campaign"]
[product.aep]
sandbox = "dev"
[product.ajo]
sandbox = "prod"
[product.analytics]
company_id = "acmecorp0"
[product.campaign]
tenant = "acme"
"""
#: Example API paths, below each product's base URL (from its documentation).
API_PATHS = {
    "generic": "/some/api",
    "aep": "/data/foundation/catalog/datasets",
    "ajo": "/journeys",
    "cja": "/data/dataviews",
    "analytics": "/users/me",
    "analytics-1.4": "",
    "campaign": "/profileAndServices/profile",
}


def read_headers(path: Path) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in path.read_text().splitlines())


async def rendered(tmp_path: Path, fake: FakeIms, scopes: list[str]) -> Path:
    """Run the daemon once on a credential with every built-in product; its output dir."""
    from imsd.daemon import run_once
    from imsd.registry import load_registry

    s = make_settings(tmp_path)
    (s.credentials_dir / "all.toml").write_text(
        'client_id = "acme-client"\nclient_secret_env = "ACME_SECRET"\n'
        f'org_id = "{ORG}"\nscopes = {json.dumps(scopes)}\nims_url = "{fake.url}"\n' + ALL_PRODUCTS
    )
    os.environ["ACME_SECRET"] = SECRET
    try:
        assert await run_once(s, load_registry(), give_up_after=10) == 0
    finally:
        del os.environ["ACME_SECRET"]
    return s.output_dir / "all"


def gateway_path(product: str) -> str:
    """``/gateway/PRODUCT`` + the path of the product's own base URL + an API path."""
    from imsd.registry import load_registry

    plugin = load_registry().products[product]
    raw = {
        "aep": {"sandbox": "dev"},
        "ajo": {"sandbox": "prod"},
        "analytics": {"company_id": "acmecorp0"},
        "campaign": {"tenant": "acme"},
    }
    base = plugin.base_url(plugin.validate_options(raw.get(product, {})))
    return (
        f"/gateway/{product}{urlsplit(base).path.rstrip('/') if base else ''}"
        + (API_PATHS[product])
    )


@pytest.mark.anyio
async def test_every_builtin_product_passes_the_gateway(tmp_path: Path, fake: FakeIms) -> None:
    """The daemon's rendered headers pass; dropping a header the documentation requires
    fails with the gateway's error, dropping any other header does not."""
    out = await rendered(tmp_path, fake, DOC_SCOPES)
    async with httpx.AsyncClient(base_url=fake.url) as client:
        for product, rule in PRODUCTS.items():
            headers = read_headers(out / f"{product}.headers")
            path = gateway_path(product)
            r = await client.get(path, headers=headers)
            assert r.status_code == 200, (product, r.text)
            required = {"authorization", "x-api-key", rule.org_header}
            for name in headers:
                fewer = {k: v for k, v in headers.items() if k != name}
                r = await client.get(path, headers=fewer)
                if name.lower() in required:
                    assert r.status_code in (400, 403), (product, name, r.text)
                    assert "error_code" in r.json()
                else:
                    assert r.status_code == 200, (product, name, r.text)


@pytest.mark.anyio
async def test_a_credential_with_only_openid_is_refused_by_every_product(
    tmp_path: Path, fake: FakeIms
) -> None:
    out = await rendered(tmp_path, fake, ["openid"])
    async with httpx.AsyncClient(base_url=fake.url) as client:
        for product in PRODUCTS:
            headers = read_headers(out / f"{product}.headers")
            r = await client.get(gateway_path(product), headers=headers)
            assert r.status_code == 403, (product, r.text)
            assert r.json()["message"] == "Profile is not valid"
