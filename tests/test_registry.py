from __future__ import annotations

import dataclasses
import importlib.metadata as md
import json
import os
import subprocess
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from imsd import registry
from imsd.daemon import run_once
from imsd.fakeims.server import FakeIms
from imsd.model import Secret
from imsd.plugin import PLUGIN_API_VERSION, CredentialView, Product, TokenView, hookimpl
from structlog.testing import capture_logs

from tests.support import ORG, SCOPES, SECRET, make_settings, write_cred


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


# -- the plugin API as a third party sees it (API 1.2) ---------------------------------------

#: A third party's auth method, in a plugin_dirs module: a client-credentials exchange built
#: only on imsd.plugin, recording what its flow was given.
AUTH_PLUGIN = """
from imsd.plugin import (
    CredentialView, HttpRequest, expires_in_unit, hookimpl, parse_token_response,
)

requires_api = "1.2"
SEEN = []


class AcmeS2S:
    name = "acme_s2s"
    notice = "acme_s2s: a test notice"
    fields = frozenset({"audience", "extra_secret_env"})

    def validate(self, table, secrets):
        if "audience" not in table:
            raise ValueError("audience: required")
        return {"audience": table["audience"],
                "extra": secrets.env(table["extra_secret_env"], "extra_secret_env")}

    def flow(self, view, now, refresh_token):
        SEEN.append(view)
        path = "/ims/token/v3"
        response = yield HttpRequest("POST", view.ims_url + path, form={
            "grant_type": "client_credentials",
            "client_id": view.client_id,
            "client_secret": view.client_secret.reveal(),
            "scope": ",".join(view.scopes),
        })
        return parse_token_response(response, now=now, unit=expires_in_unit(path))


@hookimpl
def imsd_auth_methods():
    return [AcmeS2S()]
"""


def write_plugin(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(exist_ok=True)
    path = directory / f"{name}.py"
    path.write_text(text)
    return path


@pytest.mark.anyio
async def test_third_party_auth_method_sees_only_the_credential_view(
    tmp_path: Path, fake: FakeIms, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "acme_auth_view", AUTH_PLUGIN)
    reg = registry.load_registry(plugin_dirs=[plugins])
    assert not reg.errors
    assert "acme_s2s" in reg.auth_methods
    s = make_settings(tmp_path)
    (s.credentials_dir / "acme.toml").write_text(
        f'auth = "acme_s2s"\nclient_id = "client-a"\nclient_secret = "{SECRET}"\n'
        f'org_id = "{ORG}"\nscopes = {json.dumps(SCOPES)}\nims_url = "{fake.url}"\n'
        'audience = "acme"\nextra_secret_env = "ACME_EXTRA"\n'
    )
    monkeypatch.setenv("ACME_EXTRA", "extra-secret-value")
    with capture_logs() as logs:
        assert await run_once(s, reg, give_up_after=10) == 0
    token = (s.output_dir / "acme" / "token").read_text()
    assert fake.state.validate_token(token) is not None
    [view] = sys.modules["imsd_local_plugins.acme_auth_view"].SEEN
    assert type(view) is CredentialView
    assert (view.name, view.auth, view.client_id, view.org_id) == (
        "acme",
        "acme_s2s",
        "client-a",
        ORG,
    )
    assert view.client_secret == Secret(SECRET)
    assert view.scopes == tuple(SCOPES)
    assert view.options == {"audience": "acme", "extra": Secret("extra-secret-value")}
    for internal in ("path", "digest", "on_refresh", "sources", "products", "outputs"):
        assert not hasattr(view, internal), internal
    with pytest.raises(dataclasses.FrozenInstanceError):
        view.client_id = "other"  # type: ignore[misc]
    assert SECRET not in repr(view)
    assert "extra-secret-value" not in repr(view)
    # HasNotice: the method's notice is logged for the credential, read without getattr.
    notices = [e for e in logs if e["event"] == "auth.notice"]
    assert [(e["credential"], e["notice"]) for e in notices] == [
        ("acme", "acme_s2s: a test notice")
    ]


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("1.2", (1, 2)), ("1", (1, 0)), (" 2.10 ", (2, 10)), ("99.0", (99, 0))],
)
def test_api_version_parses_major_minor(text: str, parsed: tuple[int, int]) -> None:
    assert registry.api_version(text) == parsed


@pytest.mark.parametrize("bad", ["", "v1", "1.2.3", "1.x", 1.2, 1, None])
def test_api_version_refuses_anything_else(bad: object) -> None:
    with pytest.raises(ValueError, match=r'"MAJOR\.MINOR"'):
        registry.api_version(bad)


def test_plugin_api_version_is_major_minor() -> None:
    major, minor = registry.api_version(PLUGIN_API_VERSION)
    assert (major, minor) >= (1, 2)


def versioned_plugin(requires: str) -> str:
    return f"""
from imsd.plugin import hookimpl

requires_api = {requires!r}


class Versioned:
    name = "versioned"
    default_scopes = ()

    def validate_options(self, options):
        return {{}}

    def headers(self, view):
        return {{}}

    def env(self, view):
        return {{}}

    def base_url(self, options):
        return None


@hookimpl
def imsd_products():
    return [Versioned()]
"""


@pytest.mark.parametrize(
    ("requires", "loads"),
    [("1.0", True), ("1", True), (PLUGIN_API_VERSION, True), ("1.99", False), ("2.0", False)],
)
def test_requires_api_is_checked_at_load(tmp_path: Path, requires: str, loads: bool) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, f"versioned_{requires.replace('.', '_')}", versioned_plugin(requires))
    reg = registry.load_registry(plugin_dirs=[plugins])
    assert ("versioned" in reg.products) is loads
    assert bool(reg.errors) is not loads


def test_plugin_needing_a_newer_api_is_refused_with_both_versions(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "future", versioned_plugin("99.0"))
    write_plugin(plugins, "malformed", versioned_plugin("soon"))
    write_plugin(plugins, "today", versioned_plugin("1.0").replace("versioned", "today"))
    reg = registry.load_registry(plugin_dirs=[plugins])
    errors = {p.name: p.error for p in reg.errors}
    assert errors == {
        "future": (
            f"plugin 'future' needs plugin API 99.0; this imsd provides {PLUGIN_API_VERSION}: "
            "upgrade imsd"
        ),
        "malformed": "plugin 'malformed': requires_api must be a \"MAJOR.MINOR\" string, "
        "not 'soon'",
    }
    assert "versioned" not in reg.products  # no hook of a refused plugin ran
    assert {"today", "generic"} <= set(reg.products)  # the others still load
    # imsd plugins lists it with the error, and exits 1.
    listing = subprocess.run(
        [sys.executable, "-m", "imsd", "plugins"],
        env={**os.environ, "IMSD_PLUGIN_DIRS": str(plugins)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert listing.returncode == 1, listing.stdout + listing.stderr
    [line] = [x for x in listing.stdout.splitlines() if x.startswith("future ")]
    assert (
        f"error: plugin 'future' needs plugin API 99.0; this imsd provides {PLUGIN_API_VERSION}"
        in line
    )


def test_notice_must_be_text_or_none() -> None:
    class Loud(Extra):
        name = "loud"
        notice = 42

    class Quiet(Extra):
        name = "quiet"
        notice = None

    def loud() -> list[Product]:
        return [Loud()]

    def quiet() -> list[Product]:
        return [Quiet()]

    reg = registry.load_registry(
        extra={
            "loud": plugin_module("loud", imsd_products=loud),
            "quiet": plugin_module("quiet", imsd_products=quiet),
        }
    )
    assert {p.name: p.error for p in reg.errors} == {
        "loud": "TypeError: product 'loud': notice must be a string or None"
    }
    assert "quiet" in reg.products  # and Extra, with no notice at all, loads (above)


#: A product plugin written before product instances existed: nothing in it knows of them.
INSTANCE_BLIND = """
from imsd.plugin import hookimpl


class Acme:
    name = "acme"
    default_scopes = ("openid",)

    def validate_options(self, options):
        return {"region": options.get("region", "eu")}

    def headers(self, view):
        return {"Authorization": "Bearer " + view.access_token,
                "x-acme-region": view.options["region"]}

    def env(self, view):
        return {"ACME_REGION": view.options["region"]}

    def base_url(self, options):
        return "https://acme.example/" + options["region"]


@hookimpl
def imsd_products():
    return [Acme()]
"""


@pytest.mark.anyio
async def test_product_plugin_unaware_of_instances_serves_two(
    tmp_path: Path, fake: FakeIms
) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "acme_instance_blind", INSTANCE_BLIND)
    reg = registry.load_registry(plugin_dirs=[plugins])
    assert not reg.errors
    s = make_settings(tmp_path)
    write_cred(
        s.credentials_dir,
        "two",
        fake,
        extra='products = ["acme-us", "acme"]\n[product.acme-us]\ntype = "acme"\nregion = "us"\n',
    )
    assert await run_once(s, reg, give_up_after=10) == 0
    out = s.output_dir / "two"
    token = (out / "token").read_text()
    for instance, region in (("acme-us", "us"), ("acme", "eu")):
        assert (out / f"{instance}.headers").read_text().splitlines() == [
            f"Authorization: Bearer {token}",
            f"x-acme-region: {region}",
        ]
        assert (out / f"{instance}.env").read_text() == (
            f"ACME_REGION={region}\nADOBE_BASE_URL=https://acme.example/{region}\n"
        )
