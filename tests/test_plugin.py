"""The public plugin API, and a third-party plugin distribution installed the way users do."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import imsd.plugin
import pytest
from imsd.fakeims.server import FakeIms

from tests.support import ORG, make_settings

SECRET = "p8e-ThirdPartySecret0123456789abcd"


def test_public_names_are_pinned() -> None:
    assert sorted(imsd.plugin.__all__) == [
        "AuthMethod",
        "CredentialView",
        "Discovery",
        "Flow",
        "Grant",
        "HasNotice",
        "HttpRequest",
        "HttpResponse",
        "ImsError",
        "ImsErrorKind",
        "PLUGIN_API_VERSION",
        "PROJECT",
        "Product",
        "Secret",
        "SecretSource",
        "TokenView",
        "classify_error",
        "expires_in_unit",
        "hookimpl",
        "hookspec",
        "https_or_loopback",
        "parse_token_response",
    ]
    assert imsd.plugin.PLUGIN_API_VERSION == "1.2"


def test_builtin_plugins_use_only_the_public_api() -> None:
    """The built-in products and auth methods import nothing of imsd but imsd.plugin: what
    they do, a third party's plugin can do."""
    for path in sorted((Path(__file__).resolve().parent.parent / "plugins").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            for name in names:
                if name.split(".")[0] == "imsd":
                    assert name == "imsd.plugin", f"{path.name} imports {name}"


def test_token_view_repr_hides_the_token() -> None:
    view = imsd.plugin.TokenView("c", "SECRET-TOKEN", "bearer", "id", ORG, 0.0)
    assert "SECRET-TOKEN" not in repr(view)


PLUGIN = """
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
        return {"ACME_TOKEN": view.access_token}

    def base_url(self, options):
        return "https://acme.example/" + options["region"]


@hookimpl
def imsd_products():
    return [Acme()]
"""


@pytest.fixture
def fake() -> Iterator[FakeIms]:
    # Not conftest's: the third-party plugin's client.
    with FakeIms.in_thread() as f:
        f.state.add_client("acme-client", secrets=[SECRET], scopes=["openid"], org_id=ORG)
        yield f


def test_third_party_distribution_adds_a_product(tmp_path: Path, fake: FakeIms) -> None:
    src = tmp_path / "src"
    (src / "acme_imsd").mkdir(parents=True)
    (src / "acme_imsd" / "__init__.py").write_text(PLUGIN)
    (src / "acme_imsd" / "broken.py").write_text('raise ImportError("acme-sdk is missing")\n')
    (src / "pyproject.toml").write_text(
        textwrap.dedent("""
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "acme-imsd"
        version = "1.2.3"
        [project.entry-points.imsd]
        acme = "acme_imsd"
        acme-broken = "acme_imsd.broken"
        [tool.setuptools]
        packages = ["acme_imsd"]
    """)
    )
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "--target",
            str(site),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": str(site), "ACME_SECRET": SECRET}
    listing = subprocess.run(
        [sys.executable, "-m", "imsd", "plugins"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert listing.returncode == 1, listing.stdout + listing.stderr  # one plugin is broken
    assert "acme-sdk is missing" in listing.stdout
    assert any(
        line.split()[:2] == ["acme", "1.2.3"] and "acme" in line.split()[-1]
        for line in listing.stdout.splitlines()
    ), listing.stdout

    creds, out = tmp_path / "creds", tmp_path / "out"
    creds.mkdir()
    (creds / "a.toml").write_text(
        'auth = "oauth_server_to_server"\nclient_id = "acme-client"\n'
        f'client_secret_env = "ACME_SECRET"\norg_id = "{ORG}"\nscopes = ["openid"]\n'
        f'ims_url = "{fake.url}"\nproducts = ["acme", "generic"]\n[product.acme]\n'
        'region = "us"\n'
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "imsd",
            "once",
            "--credentials-dir",
            str(creds),
            "--output-dir",
            str(out),
            "--state-dir",
            str(tmp_path / "state"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    token = (out / "a" / "token").read_text()
    assert (out / "a" / "acme.headers").read_text().splitlines() == [
        f"Authorization: Bearer {token}",
        "x-acme-region: us",
    ]
    # The daemon adds ADOBE_BASE_URL from the product's base_url() to every env file.
    assert (out / "a" / "acme.env").read_text() == (
        f"ACME_TOKEN={token}\nADOBE_BASE_URL=https://acme.example/us\n"
    )
    assert (out / "a" / "generic.headers").exists()


# -- the README example, notification hooks (built-in products at the gateway: test_gateway.py)


def read_headers(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines)


def readme_plugin() -> str:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("<!-- plugin-example:start -->")[1]
    block = block.split("<!-- plugin-example:end -->")[0]
    return block.split("```python\n", 1)[1].rsplit("```", 1)[0]


def test_readme_plugin_example_works(tmp_path: Path, fake: FakeIms) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "io_events.py").write_text(readme_plugin())
    creds, out = tmp_path / "creds", tmp_path / "out"
    creds.mkdir()
    (creds / "events.toml").write_text(
        'client_id = "acme-client"\nclient_secret_env = "ACME_SECRET"\n'
        f'org_id = "{ORG}"\nscopes = ["openid"]\nims_url = "{fake.url}"\n'
        'products = ["io-events"]\n[product.io-events]\nconsumer_org = "23294"\n'
    )
    env = {**os.environ, "ACME_SECRET": SECRET, "IMSD_PLUGIN_DIRS": str(plugins)}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "imsd",
            "once",
            "--credentials-dir",
            str(creds),
            "--output-dir",
            str(out),
            "--state-dir",
            str(tmp_path / "state"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    token = (out / "events" / "token").read_text()
    assert read_headers(out / "events" / "io-events.headers") == {
        "Authorization": f"Bearer {token}",
        "x-api-key": "acme-client",
        "x-ims-org-id": ORG,
    }
    assert "ADOBE_CONSUMER_ORG=23294" in (out / "events" / "io-events.env").read_text()
    assert "events: new token until" in r.stdout  # the notification hook ran


@pytest.mark.anyio
async def test_notification_hooks_and_a_raising_plugin(tmp_path: Path, fake: FakeIms) -> None:
    import types

    from imsd.daemon import run_once
    from imsd.plugin import hookimpl
    from imsd.registry import load_registry

    calls: list[tuple[str, str]] = []

    def refreshed(credential: str, output_dir: str) -> None:
        calls.append(("refreshed", credential))
        assert Path(output_dir, "token").exists()  # called after the files are written

    def failed(credential: str, error: str, state: str) -> None:
        calls.append(("failed", f"{credential}:{state}:{'invalid_client' in error}"))

    def explode(credential: str) -> None:
        raise RuntimeError("plugin bug")

    good = types.ModuleType("good")
    good.imsd_token_refreshed = hookimpl(refreshed)  # type: ignore[attr-defined]
    good.imsd_credential_failed = hookimpl(failed)  # type: ignore[attr-defined]
    bad = types.ModuleType("bad")
    bad.imsd_token_refreshed = hookimpl(explode)  # type: ignore[attr-defined]
    bad.imsd_credential_failed = hookimpl(explode)  # type: ignore[attr-defined]
    s = make_settings(tmp_path)
    for name, secret in (("ok", SECRET), ("wrong", "p8e-wrong-000000000000000")):
        (s.credentials_dir / f"{name}.toml").write_text(
            f'client_id = "acme-client"\nclient_secret = "{secret}"\norg_id = "{ORG}"\n'
            f'scopes = ["openid"]\nims_url = "{fake.url}"\n'
        )
    registry = load_registry(extra={"bad": bad, "good": good})
    assert await run_once(s, registry, give_up_after=5) == 1
    assert ("refreshed", "ok") in calls
    assert ("failed", "wrong:expired:True") in calls
