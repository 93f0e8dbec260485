"""The public plugin API, and a third-party plugin distribution installed the way users do."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import imsd.plugin
import pytest
from imsd.fakeims.server import FakeIms

ORG = "0123456789ABCDEF01234567@AdobeOrg"
SECRET = "p8e-ThirdPartySecret0123456789abcd"


def test_public_names_are_pinned() -> None:
    assert sorted(imsd.plugin.__all__) == [
        "PLUGIN_API_VERSION",
        "PROJECT",
        "Product",
        "TokenView",
        "hookimpl",
        "hookspec",
    ]
    assert imsd.plugin.PLUGIN_API_VERSION == 1


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
    assert (out / "a" / "acme.env").read_text() == f"ACME_TOKEN={token}\n"
    assert (out / "a" / "generic.headers").exists()
