"""Analytics 2.0 company discovery (``GET /discovery/me``) end to end: the fake gateway's
endpoint, and the daemon discovering a credential's company after its first token, using it
in every output, reporting failures as the credential's error without dropping the token,
and discovering again when the credential changes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from imsd.discovery import MAX_REQUESTS, Discoveries
from imsd.fakeims import discovery
from imsd.fakeims.server import FakeIms
from imsd.model import Credential, Grant, Secret
from imsd.plugin import Discovery, HttpRequest, HttpResponse, TokenView
from imsd.render import render_safe

from tests.support import ORG, SECRET, live, uds, wait_for, write_cred

pytestmark = pytest.mark.anyio

TWO = [
    {"globalCompanyId": "acme0", "companyName": "Acme"},
    {"globalCompanyId": "other1", "companyName": "Other Corp"},
]


def analytics(fake: FakeIms, extra: str = "") -> str:
    """An analytics instance without company_id, discovering at the fake, beside aep."""
    return (
        'products = ["analytics", "aep"]\n[product.analytics]\n'
        f'discovery_url = "{fake.url}/discovery/me"\n{extra}'
    )


async def _token(fake: FakeIms) -> str:
    async with httpx.AsyncClient(base_url=fake.url) as c:
        r = await c.post(
            "/ims/token/v3",
            data={
                "grant_type": "client_credentials",
                "client_id": "client-a",
                "client_secret": SECRET,
                "scope": "openid",
            },
        )
        return str(r.json()["access_token"])


async def test_fake_discovery_has_adobes_shape(fake: FakeIms) -> None:
    token = await _token(fake)
    auth = {"Authorization": f"Bearer {token}", "x-api-key": "client-a"}
    async with httpx.AsyncClient(base_url=fake.url) as c:
        body = (await c.get("/discovery/me", headers=auth)).json()
        default = [dict(discovery.DEFAULT_COMPANY)]
        assert body["imsOrgs"] == [{"imsOrgId": ORG, "companies": default}]
        assert isinstance(body["imsUserId"], str)
        # Companies are set per client, in process or over HTTP from another one.
        r = await c.post("/_fake/companies", json={"client_id": "client-a", "companies": TWO})
        assert r.status_code == 200
        companies = (await c.get("/discovery/me", headers=auth)).json()["imsOrgs"][0]["companies"]
        assert [(x["globalCompanyId"], x["companyName"]) for x in companies] == [
            ("acme0", "Acme"),
            ("other1", "Other Corp"),
        ]
        # The gateway's checks and error format.
        for headers, status, code in [
            ({}, 403, "403010"),
            ({"Authorization": "Bearer forged"}, 401, "401013"),
            ({"Authorization": f"Bearer {token}"}, 403, "403000"),
            ({"Authorization": f"Bearer {token}", "x-api-key": "client-b"}, 403, "403003"),
        ]:
            r = await c.get("/discovery/me", headers=headers)
            assert (r.status_code, r.json()["error_code"]) == (status, code)


async def test_one_company_is_discovered_and_used_everywhere(
    tmp_path: Path, fake: FakeIms, running: Any
) -> None:
    # The client's one company by default (the one the fake gateway lets it call).
    company = discovery.DEFAULT_COMPANY["globalCompanyId"]
    write_cred(tmp_path / "creds", "a", fake, extra=analytics(fake))
    d = await running()
    out = tmp_path / "tokens" / "a"
    headers = dict(
        line.split(": ", 1) for line in (out / "analytics.headers").read_text().splitlines()
    )
    assert headers["x-proxy-global-company-id"] == company
    env = (out / "analytics.env").read_text().splitlines()
    assert f"ADOBE_COMPANY_ID={company}" in env
    assert f"ADOBE_BASE_URL=https://analytics.adobe.io/api/{company}" in env
    doc = json.loads((out / "token.json").read_text())
    assert doc["instances"]["analytics"]["base_url"] == f"https://analytics.adobe.io/api/{company}"
    assert doc["headers"]["analytics"] == headers  # the existing key, unchanged
    assert live(d, "a").last_error is None
    async with uds(d) as c:
        body = (await c.get("/v1/credentials/a/headers", params={"product": "analytics"})).json()
        assert body["type"] == "analytics"
        assert body["base_url"] == f"https://analytics.adobe.io/api/{company}"
        assert body["headers"] == headers
        assert (await c.get("/v1/credentials/a/token")).json() == doc
    # What the daemon discovered satisfies the gateway.
    async with httpx.AsyncClient(base_url=fake.url) as c:
        r = await c.get(f"/gateway/analytics/api/{company}/reportsuites", headers=headers)
        assert r.status_code == 200, r.text


async def test_several_companies_are_the_credentials_error_and_the_token_stays(
    tmp_path: Path, fake: FakeIms, running: Any
) -> None:
    discovery.set_companies(fake.state, "client-a", TWO)
    write_cred(tmp_path / "creds", "a", fake, extra=analytics(fake))
    d = await running()
    out = tmp_path / "tokens" / "a"
    error = live(d, "a").last_error
    assert "product 'analytics'" in error
    assert "2 companies: acme0 (Acme), other1 (Other Corp)" in error
    assert "company_id" in error
    # The token and the other instance are served; only analytics' files are left out.
    token = (out / "token").read_text()
    assert token
    assert (out / "aep.headers").exists()
    assert not (out / "analytics.headers").exists()
    assert not (out / "analytics.env").exists()
    doc = json.loads((out / "token.json").read_text())
    assert sorted(doc["instances"]) == ["aep"]
    async with uds(d) as c:
        r = await c.get("/v1/credentials/a/token")
        assert r.status_code == 200
        assert r.json()["access_token"] == token
        r = await c.get("/v1/credentials/a/headers", params={"product": "analytics"})
        assert r.status_code == 500
        assert "2 companies" in r.json()["message"]
        listing = (await c.get("/v1/credentials")).json()["credentials"]
        assert listing[0]["state"] == "stale"
        assert "2 companies" in listing[0]["last_error"]

    # Choosing one fixes it; a changed credential is a new version (no discovery needed now).
    write_cred(tmp_path / "creds", "a", fake, extra=analytics(fake, 'company_id = "other1"\n'))
    await wait_for(lambda: (out / "analytics.headers").exists())
    assert "x-proxy-global-company-id: other1\n" in (out / "analytics.headers").read_text()
    await wait_for(lambda: live(d, "a").last_error is None)


async def test_a_changed_credential_is_discovered_again(
    tmp_path: Path, fake: FakeIms, running: Any
) -> None:
    discovery.set_companies(fake.state, "client-a", [{"globalCompanyId": "acme0"}])
    write_cred(tmp_path / "creds", "a", fake, extra=analytics(fake))
    await running()
    out = tmp_path / "tokens" / "a"
    assert "ADOBE_COMPANY_ID=acme0\n" in (out / "analytics.env").read_text()
    discovery.set_companies(fake.state, "client-a", [{"globalCompanyId": "newco1"}])
    write_cred(tmp_path / "creds", "a", fake, extra=analytics(fake, "\n"))
    await wait_for(lambda: "ADOBE_COMPANY_ID=newco1\n" in (out / "analytics.env").read_text())


@pytest.mark.parametrize(
    ("companies", "url", "needle"),
    [
        ([], "/discovery/me", "found no Analytics company"),
        (None, "/no/such/discovery", "answered HTTP 404"),
        (None, "http://127.0.0.1:9/discovery/me", "discovery failed: "),
    ],
)
async def test_discovery_failures_name_the_instance(
    tmp_path: Path,
    fake: FakeIms,
    running: Any,
    companies: list[dict[str, str]] | None,
    url: str,
    needle: str,
) -> None:
    if companies is not None:
        discovery.set_companies(fake.state, "client-a", companies)
    full = url if url.startswith("http") else fake.url + url
    extra = f'products = ["analytics"]\n[product.analytics]\ndiscovery_url = "{full}"\n'
    write_cred(tmp_path / "creds", "a", fake, extra=extra)
    d = await running()
    error = live(d, "a").last_error
    assert "a: product 'analytics'" in error, error
    assert needle in error, error
    assert (tmp_path / "tokens" / "a" / "token").read_text()  # the token is never dropped


# -- the plugin API's rules, with a third party's discover() ------------------------------------

TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJ0eXBlIjoiYWNjZXNzX3Rva2VuIn0.c2ln-_"


class Finder:
    """A third-party product whose discovery does what the test says."""

    name = "finder"
    default_scopes: tuple[str, ...] = ()

    def __init__(self, how: str) -> None:
        self.how = how

    def validate_options(self, options: Mapping[str, Any]) -> Mapping[str, Any]:
        return dict(options)

    def headers(self, view: TokenView) -> dict[str, str]:
        return {"x-found": str(view.options["found"])}

    def env(self, view: TokenView) -> dict[str, str]:
        return {}

    def base_url(self, options: Mapping[str, Any]) -> str | None:
        return None

    def discover(self, view: TokenView) -> Discovery | None:
        return None if "found" in view.options else self._flow(view)

    def _flow(self, view: TokenView) -> Discovery:
        url = "http://api.example.com/me" if self.how == "cleartext" else "https://a.example/me"
        answer = yield HttpRequest("GET", url)
        while self.how == "loop":
            answer = yield HttpRequest("GET", url)
        if self.how == "leak":
            raise ValueError(f"cannot use {view.access_token} here")
        if self.how == "bug":
            raise RuntimeError(view.access_token)
        return {"found": answer.body.decode()}


@pytest.mark.parametrize(
    ("how", "outcome"),
    [
        ("ok", "x-found: it\n"),
        ("leak", "cannot use <redacted> here"),
        ("bug", "discovery failed (RuntimeError)"),
        ("cleartext", "discovery asked for a URL that is not https"),
        ("loop", f"discovery made more than {MAX_REQUESTS} requests"),
    ],
)
async def test_discover_hook_rules(how: str, outcome: str) -> None:
    sent: list[str] = []

    async def send(request: HttpRequest) -> HttpResponse:
        sent.append(request.url)
        return HttpResponse(200, {}, b"it")

    products = {"finder": Finder(how)}
    cred = Credential(
        name="c",
        path=Path("/c.toml"),
        auth="oauth_server_to_server",
        client_id="cid",
        client_secret=Secret("s"),
        org_id=ORG,
        scopes=("openid",),
        products=("finder",),
    )
    grant = Grant(Secret(TOKEN), "bearer", 1_800_000_000.0, 1_800_086_400.0)
    found = Discoveries(send)
    pending = render_safe(found.resolved(cred, grant, products), grant, products)[1]
    assert "not finished" in str(pending[0])
    resolved = await found.resolve(cred, grant, products)
    assert found.resolved(cred, grant, products) is resolved  # kept for this version
    files, left_out = render_safe(resolved, grant, products)
    if how == "ok":
        assert files["finder.headers"].decode() == outcome
    else:
        assert outcome in str(left_out[0])
        assert TOKEN not in str(left_out[0])
    assert all(url.startswith("https://") for url in sent)
    assert len(sent) <= MAX_REQUESTS
