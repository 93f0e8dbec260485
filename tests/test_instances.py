"""Product instances: one credential, one token, several sandboxes / companies / tenants
(``[product.aep-dev] type = "aep"``). Parsing and validation, the files each instance gets,
and the daemon serving them from a single IMS exchange."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest
from imsd.client import headers
from imsd.credentials import parse_credentials
from imsd.execmode import exec_env
from imsd.fakeims.server import FakeIms
from imsd.model import Credential, CredentialError, Grant, Secret
from imsd.registry import load_registry, validate_products
from imsd.render import render_safe

from tests.support import ORG, uds, write_cred

PRODUCTS = load_registry().products
PATH = Path("creds/a.toml")
HEAD = f'client_id = "cid"\nclient_secret = "s3cr3t-value"\norg_id = "{ORG}"\nscopes = ["openid"]\n'
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJ0eXBlIjoiYWNjZXNzX3Rva2VuIn0.c2ln-_"
GRANT = Grant(Secret(TOKEN), "bearer", 1_800_000_000.0, 1_800_086_400.0)


def load(body: str) -> Credential:
    """A credential as the daemon sees it: parsed, then validated against the plugins."""
    [cred] = parse_credentials(PATH, (HEAD + body).encode(), env={})
    return validate_products(cred, PRODUCTS)


ISSUE_EXAMPLE = """products = ["aep", "aep-dev", "campaign", "campaign-stage"]
[product.aep]
sandbox = "prod"
[product.aep-dev]
type = "aep"
sandbox = "dev"
[product.campaign]
tenant = "acme"
[product.campaign-stage]
type = "campaign"
tenant = "acme"
instance = "stage"
"""


@pytest.mark.parametrize(
    ("body", "instances", "options"),
    [
        # Files written before instances existed keep their meaning.
        ('products = ["aep"]\n[product.aep]\nsandbox = "dev"\n', [("aep", "aep")], None),
        ("", [("generic", "generic")], None),
        # type equal to the key's own product: still the plain product.
        (
            'products = ["aep"]\n[product.aep]\ntype = "aep"\nsandbox = "dev"\n',
            [("aep", "aep")],
            {"aep": {"sandbox": "dev"}},
        ),
        # An instance without its plain product; default options.
        (
            'products = ["aep-dev"]\n[product.aep-dev]\ntype = "aep"\n',
            [("aep-dev", "aep")],
            {"aep-dev": {"sandbox": "prod"}},
        ),
        (
            ISSUE_EXAMPLE,
            [
                ("aep", "aep"),
                ("aep-dev", "aep"),
                ("campaign", "campaign"),
                ("campaign-stage", "campaign"),
            ],
            {
                "aep": {"sandbox": "prod"},
                "aep-dev": {"sandbox": "dev"},
                "campaign": {"tenant": "acme", "instance": "prod"},
                "campaign-stage": {"tenant": "acme", "instance": "stage"},
            },
        ),
    ],
)
def test_valid_instances(
    body: str, instances: list[tuple[str, str]], options: dict[str, Any] | None
) -> None:
    cred = load(body)
    assert list(cred.product_instances) == instances
    assert cred.products == tuple(dict.fromkeys(p for _, p in instances))  # each plugin once
    if options is not None:
        assert cred.product_options == options


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (
            'products = ["aep", "aep-dev"]\n[product.aep-dev]\ntype = "aep"\nsandbox = "a b"\n',
            "creds/a.toml: product.aep-dev: option 'sandbox' must be",
        ),
        (
            'products = ["aep-dev"]\n[product.aep-dev]\ntype = "aepx"\n',
            "creds/a.toml: product.aep-dev: type: unknown product 'aepx' (known: ",
        ),
        (
            'products = ["aep-dev"]\n[product.aep-dev]\nsandbox = "dev"\n',
            "creds/a.toml: products: unknown product 'aep-dev' (known: ",
        ),
        (
            'products = ["aep-dev"]\n',
            '[product.aep-dev] type = "PRODUCT"',
        ),
        (
            'products = ["aep-dev"]\n[product.aep-dev]\ntype = 1\n',
            "creds/a.toml: product.aep-dev: type: must be a product name",
        ),
        (
            'products = ["campaign"]\n[product.campaign]\ntype = "aep"\n',
            "creds/a.toml: product.campaign: type: 'campaign' is a product itself",
        ),
        (
            'products = ["token"]\n[product.token]\ntype = "aep"\n',
            "creds/a.toml: product.token: an instance name must be",
        ),
        (
            'products = ["token.json"]\n[product."token.json"]\ntype = "aep"\n',
            "creds/a.toml: product.token.json: an instance name must be",
        ),
        (
            'products = ["../x"]\n[product."../x"]\ntype = "aep"\n',
            "creds/a.toml: product.../x: an instance name must be",
        ),
        (
            'products = [".."]\n[product.".."]\ntype = "aep"\n',
            "creds/a.toml: product...: an instance name must be",
        ),
        (
            'products = ["aep"]\n[product.aep-dev]\ntype = "aep"\n',
            "creds/a.toml: product: options for a product not in products: 'aep-dev'",
        ),
        (
            'products = ["x"]\n[product.x]\ntype = "campaign"\ninstance = "dev"\n',
            "creds/a.toml: product.x: option 'instance' must be",
        ),
    ],
)
def test_invalid_instances_are_named(body: str, error: str) -> None:
    with pytest.raises(CredentialError) as e:
        load(body)
    assert error in str(e.value)


def test_each_instance_gets_its_files() -> None:
    files, left_out = render_safe(load(ISSUE_EXAMPLE), GRANT, PRODUCTS)
    assert left_out == []
    instances = ("aep", "aep-dev", "campaign", "campaign-stage")
    names = [f"{i}.{kind}" for i in instances for kind in ("env", "headers")]
    assert sorted(files) == sorted([*names, "token", "token.json"])
    assert b"x-sandbox-name: prod\n" in files["aep.headers"]
    assert b"x-sandbox-name: dev\n" in files["aep-dev.headers"]
    assert b"ADOBE_SANDBOX_NAME=dev\n" in files["aep-dev.env"]
    assert b"ADOBE_BASE_URL=https://mc.adobe.io/acme/campaign\n" in files["campaign.env"]
    stage = b"ADOBE_BASE_URL=https://mc.adobe.io/acme-mkt-stage/campaign\n"
    assert stage in files["campaign-stage.env"]
    doc = json.loads(files["token.json"])
    assert list(doc["headers"]) == ["aep", "aep-dev", "campaign", "campaign-stage"]
    assert doc["headers"]["aep-dev"]["x-sandbox-name"] == "dev"


def test_an_instance_of_a_product_not_loaded_is_left_out_alone() -> None:
    # validate_products refuses it; a credential rendered with fewer plugins (a plugin
    # removed since) loses only that instance's files.
    cred = load(ISSUE_EXAMPLE)
    without = {k: v for k, v in PRODUCTS.items() if k != "campaign"}
    files, left_out = render_safe(cred, GRANT, without)
    assert sorted(f for f in files if f.endswith(".headers")) == ["aep-dev.headers", "aep.headers"]
    assert [u.files for u in left_out] == [
        ("campaign.headers", "campaign.env", "headers.campaign in token.json"),
        ("campaign-stage.headers", "campaign-stage.env", "headers.campaign-stage in token.json"),
    ]
    assert "unknown product 'campaign'" in left_out[1].reason


@pytest.mark.anyio
async def test_one_exchange_serves_every_instance(
    tmp_path: Path, fake: FakeIms, running: Any
) -> None:
    extra = (
        'products = ["aep", "aep-dev"]\n[product.aep]\nsandbox = "prod"\n'
        '[product.aep-dev]\ntype = "aep"\nsandbox = "dev"\n'
    )
    write_cred(tmp_path / "creds", "a", fake, extra=extra)
    d = await running()
    out = tmp_path / "tokens" / "a"
    assert fake.state.request_count("client-a") == 1, fake.state.request_log
    assert "x-sandbox-name: prod\n" in (out / "aep.headers").read_text()
    assert "x-sandbox-name: dev\n" in (out / "aep-dev.headers").read_text()
    assert "ADOBE_SANDBOX_NAME=dev\n" in (out / "aep-dev.env").read_text()
    token = (out / "token").read_text()
    async with uds(d) as c:
        r = await c.get("/v1/credentials/a/headers", params={"product": "aep-dev"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["product"] == "aep-dev"
        assert body["headers"]["x-sandbox-name"] == "dev"
        assert body["headers"]["Authorization"] == f"Bearer {token}"
        r = await c.get("/v1/credentials/a/headers")  # default: the first instance
        assert r.json()["headers"]["x-sandbox-name"] == "prod"
        listing = (await c.get("/v1/credentials")).json()["credentials"]
        assert listing[0]["products"] == ["aep", "aep-dev"]
        doc = (await c.get("/v1/credentials/a/token")).json()
        assert doc["headers"]["aep-dev"]["x-sandbox-name"] == "dev"
        r = await c.get("/v1/credentials/a/headers", params={"product": "aep-prod"})
        assert (r.status_code, r.json()["error"]) == (404, "unknown_product")
        assert "it has: aep, aep-dev" in r.json()["message"]
    # The client library and imsd exec take the instance name like a product name.
    sock = d.settings.socket
    dev = await anyio.to_thread.run_sync(lambda: headers("a", product="aep-dev", socket=sock))
    assert dev["x-sandbox-name"] == "dev"
    assert headers("a", product="aep-dev", output_dir=out.parent) == dev
    assert exec_env(out.parent, "a", "aep-dev")["ADOBE_SANDBOX_NAME"] == "dev"
    assert fake.state.request_count("client-a") == 1
