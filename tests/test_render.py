from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from imsd.model import Credential, Grant, Secret
from imsd.plugin import Product, TokenView
from imsd.registry import load_registry
from imsd.render import RenderError, render_outputs, rfc3339

PRODUCTS = load_registry().products
ORG = "0123456789ABCDEF01234567@AdobeOrg"
GRANT = Grant(Secret("TOKEN123"), "bearer", 1_800_000_000.0, 1_800_086_400.0)


def cred(**kw: Any) -> Credential:
    base: dict[str, Any] = dict(
        name="c",
        path=Path("/c.toml"),
        auth="oauth_server_to_server",
        client_id="cid",
        client_secret=Secret("s"),
        org_id=ORG,
        scopes=("openid",),
    )
    return Credential(**{**base, **kw})


def test_generic_files_exactly() -> None:
    files = render_outputs(cred(), GRANT, PRODUCTS)
    assert files["token"] == b"TOKEN123"
    assert (
        files["generic.headers"]
        == (f"Authorization: Bearer TOKEN123\nx-api-key: cid\nx-gw-ims-org-id: {ORG}\n").encode()
    )
    assert (
        files["generic.env"]
        == (f"ADOBE_ACCESS_TOKEN=TOKEN123\nADOBE_API_KEY=cid\nADOBE_ORG_ID={ORG}\n").encode()
    )
    doc = json.loads(files["token.json"])
    assert doc == {
        "credential": "c",
        "access_token": "TOKEN123",
        "token_type": "bearer",
        "expires_at": "2027-01-16T08:00:00Z",
        "issued_at": "2027-01-15T08:00:00Z",
        "client_id": "cid",
        "org_id": ORG,
        "headers": {
            "generic": {
                "Authorization": "Bearer TOKEN123",
                "x-api-key": "cid",
                "x-gw-ims-org-id": ORG,
            }
        },
    }


def test_multi_product_outputs_and_extra_headers_last() -> None:
    c = cred(
        products=("aep", "cja"),
        product_options={"aep": {"sandbox": "dev"}, "cja": {}},
        extra_headers={"x-api-key": "override", "x-team": "a"},
    )
    files = render_outputs(c, GRANT, PRODUCTS)
    assert sorted(files) == [
        "aep.env",
        "aep.headers",
        "cja.env",
        "cja.headers",
        "token",
        "token.json",
    ]
    assert b"x-sandbox-name: dev\n" in files["aep.headers"]
    assert b"x-api-key: override\n" in files["cja.headers"]
    assert json.loads(files["token.json"])["headers"]["aep"]["x-team"] == "a"


def test_outputs_subset() -> None:
    assert sorted(render_outputs(cred(outputs=("token",)), GRANT, PRODUCTS)) == ["token"]


class Hostile:
    name = "hostile"
    default_scopes: tuple[str, ...] = ()

    def __init__(
        self, headers: dict[str, str], env: dict[str, str] | None = None, boom: bool = False
    ) -> None:
        self._h, self._e, self._boom = headers, env or {}, boom

    def validate_options(self, options: Mapping[str, Any]) -> Mapping[str, Any]:
        return {}

    def headers(self, view: TokenView) -> dict[str, str]:
        if self._boom:
            raise RuntimeError(f"leaking {view.access_token}")
        return self._h

    def env(self, view: TokenView) -> dict[str, str]:
        return self._e

    def base_url(self, options: Mapping[str, Any]) -> str | None:
        return None


@pytest.mark.parametrize(
    "product",
    [
        Hostile({"x-a": "v\r\nInjected: 1"}),
        Hostile({"bad name": "v"}),
        Hostile({"x-a": "ok"}, {"KEY": "line\nNEXT=1"}),
        Hostile({"x-a": "ok"}, {"1KEY": "v"}),
        Hostile({"x-a": "ok"}, {"KEY": '"quoted"'}),
        Hostile({}, boom=True),
    ],
)
def test_hostile_products_rejected_without_leaking(product: Product) -> None:
    c = cred(products=("hostile",))
    with pytest.raises(RenderError) as err:
        render_outputs(c, GRANT, {"hostile": product})
    assert "TOKEN123" not in str(err.value)
    assert "hostile" in str(err.value)


@given(st.text(max_size=20), st.text(max_size=20) | st.sampled_from(["a\x85b", "a\u2028b"]))
def test_no_header_line_injection(name: str, value: str) -> None:
    c = cred(products=("hostile",))
    try:
        files = render_outputs(c, GRANT, {"hostile": Hostile({name: value})})
    except RenderError:
        return
    lines = files["hostile.headers"].decode().splitlines()
    assert len(lines) == 1
    assert lines[0] == f"{name}: {value}"


def test_rfc3339() -> None:
    assert rfc3339(0) == "1970-01-01T00:00:00Z"
