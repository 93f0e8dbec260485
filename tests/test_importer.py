"""Developer Console downloads: read as they are by the daemon, and turned into native files
by ``imsd import``. The fixtures (tests/fixtures/console) carry fake values."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given
from hypothesis import strategies as st
from imsd import tomlfile
from imsd.credentials import decode, parse_credentials
from imsd.daemon import run_once
from imsd.fakeims.server import FakeIms
from imsd.importer import ImportFailed, check_plan, login_needed, plan_import
from imsd.registry import load_registry

from tests.support import ORG, TECH, certificate, make_settings, private_pem, rsa_key

FIXTURES = Path(__file__).parent / "fixtures" / "console"
FLAT_SECRETS = ["p8e-FAKEFAKEFAKEFAKEFAKEFAKEFAKE01", "p8e-FAKEFAKEFAKEFAKEFAKEFAKEFAKE02"]
SCOPES = [
    "openid",
    "session",
    "AdobeID",
    "read_organizations",
    "additional_info.projectedProductContext",
    "additional_info.job_function",
]


@pytest.fixture
def fake() -> Iterator[FakeIms]:
    """Not conftest's: the fake IMS knows the clients of the Console exports in
    tests/fixtures (same ids and secrets)."""
    with FakeIms.in_thread() as f:
        f.state.add_client(
            "0123456789abcdef0123456789abcdef", secrets=FLAT_SECRETS, scopes=SCOPES, org_id=ORG
        )
        f.state.add_client(
            "fedcba9876543210fedcba9876543210",
            secrets=["p8e-FAKEPROJECTFAKEPROJECTFAKE01"],
            scopes=SCOPES,
            org_id=ORG,
        )
        f.state.add_client(
            "00112233445566778899aabbccddeeff",
            secrets=["p8e-FAKEANALYTICSFAKEANALYTICS01"],
            scopes=SCOPES,
            org_id=ORG,
        )
        yield f


@pytest.mark.anyio
async def test_both_console_shapes_load_unchanged(tmp_path: Path, fake: FakeIms) -> None:
    s = make_settings(tmp_path, ims_url=fake.url)
    for name in ("oauth-s2s.json", "project.json"):
        shutil.copy(FIXTURES / name, s.credentials_dir / name)
    assert await run_once(s, load_registry(), give_up_after=10) == 0
    written = sorted(p.name for p in s.output_dir.iterdir())
    # The project's JWT twin of the S2S credential is skipped; the API-key entry mints nothing.
    assert written == ["oauth-s2s", "project.Analytics-reporting", "project.S2S-credential"]
    for name in written:
        token = (s.output_dir / name / "token").read_text()
        assert fake.state.validate_token(token) is not None
    assert {e.client_id for e in fake.state.request_log} == {
        "0123456789abcdef0123456789abcdef",
        "fedcba9876543210fedcba9876543210",
        "00112233445566778899aabbccddeeff",
    }


def imsd(*args: str, secret_roots: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMSD_")}
    if secret_roots is not None:  # the daemon's own setting: where a key file may be
        env["IMSD_SECRET_ROOTS"] = str(secret_roots)
    return subprocess.run(
        [sys.executable, "-m", "imsd", *args], capture_output=True, text=True, timeout=60, env=env
    )


@pytest.mark.anyio
async def test_import_writes_a_native_file_and_a_0600_secret(tmp_path: Path, fake: FakeIms) -> None:
    s = make_settings(tmp_path, ims_url=fake.url)
    out = imsd(
        "import",
        str(FIXTURES / "oauth-s2s.json"),
        "--name",
        "aep",
        "--product",
        "aep",
        "--secret-index",
        "1",
        "--credentials-dir",
        str(s.credentials_dir),
    )
    assert out.returncode == 0, out.stderr
    toml = (s.credentials_dir / "aep.toml").read_text()
    table = tomllib.loads(toml)
    secret = s.credentials_dir / "aep.secret"
    assert secret.read_text() == FLAT_SECRETS[1] + "\n"
    assert secret.stat().st_mode & 0o777 == 0o600
    for value in FLAT_SECRETS:
        assert value not in toml
        assert value not in out.stdout + out.stderr
    assert (table["client_secret_file"], table["products"]) == ("aep.secret", ["aep"])
    # What import wrote, the daemon loads.
    assert await run_once(s, load_registry(), give_up_after=10) == 0
    assert (s.output_dir / "aep" / "aep.headers").exists()
    # Never replaces a file unless asked to.
    again = imsd(
        "import", str(FIXTURES / "oauth-s2s.json"), "--name", "aep", "--dir", str(s.credentials_dir)
    )
    assert again.returncode == 1
    assert "already exist" in again.stderr
    forced = imsd(
        "import",
        str(FIXTURES / "oauth-s2s.json"),
        "--name",
        "aep",
        "--dir",
        str(s.credentials_dir),
        "--force",
    )
    assert forced.returncode == 0, forced.stderr
    assert secret.read_text() == FLAT_SECRETS[0] + "\n"


def test_import_a_project_writes_one_credential_per_entry(tmp_path: Path) -> None:
    files = plan_import((FIXTURES / "project.json").read_bytes(), source="project.json")
    assert sorted(f.name for f in files) == [
        "project.Analytics-reporting.secret",
        "project.Analytics-reporting.toml",
        "project.S2S-credential.secret",
        "project.S2S-credential.toml",
    ]
    assert all(f.mode == 0o600 for f in files if f.secret)
    assert "p8e-" not in repr(files)


def test_import_jwt_needs_the_private_key(tmp_path: Path) -> None:
    download = {
        "project": {
            "org": {"ims_org_id": ORG},
            "workspace": {
                "details": {
                    "credentials": [
                        {
                            "name": "svc",
                            "jwt": {
                                "client_id": "jwt-client",
                                "client_secret": "p8e-JWTSECRETJWTSECRET",
                                "technical_account_id": TECH,
                                "meta_scopes": ["ent_dataservices_sdk"],
                            },
                        }
                    ]
                }
            },
        }
    }
    path = tmp_path / "svc.json"
    path.write_text(json.dumps(download))
    with pytest.raises(ImportFailed, match="--private-key"):
        plan_import(path.read_bytes(), source=str(path))
    key = tmp_path / "private.key"
    key.write_bytes(private_pem(rsa_key()))
    creds = tmp_path / "creds"
    out = imsd("import", str(path), "--private-key", str(key), "--dir", str(creds))
    assert "outside every secret root" in out.stderr  # the daemon would refuse to read it
    assert "secret_roots" in out.stderr
    assert not (creds / "svc.toml").exists()
    out = imsd(
        "import", str(path), "--private-key", str(key), "--dir", str(creds), secret_roots=tmp_path
    )
    assert out.returncode == 0, out.stderr
    table = tomllib.loads((creds / "svc.toml").read_text())
    assert table["auth"] == "jwt"
    assert table["private_key_file"] == str(key)
    assert table["metascopes"] == ["ent_dataservices_sdk"]


def test_import_aem_keeps_the_inline_key_in_a_0600_file(tmp_path: Path) -> None:
    pem = private_pem(rsa_key()).decode()
    download = {
        "ok": True,
        "integration": {
            "imsEndpoint": "ims-na1.adobelogin.com",
            "metascopes": "ent_aem_cloud_api",
            "technicalAccount": {"clientId": "aem-client", "clientSecret": "p8e-AEMSECRET0000"},
            "email": "x@techacct.adobe.com",
            "id": TECH,
            "org": ORG,
            "privateKey": pem,
        },
    }
    path = tmp_path / "aem.json"
    path.write_text(json.dumps(download))
    files = {f.name: f for f in plan_import(path.read_bytes(), source=str(path))}
    assert files["aem.key"].mode == 0o600
    assert files["aem.key"].data.decode() == pem
    toml = files["aem.toml"].data.decode()
    table = tomllib.loads(toml)
    assert table["private_key_file"] == "aem.key"
    assert table["ims_url"] == "https://ims-na1.adobelogin.com"
    assert "PRIVATE KEY" not in toml


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"{not json", "not JSON"),
        (b'{"client_id": "x"}', "not a Developer Console download"),
        (b'{"CLIENT_ID": "x", "ORG_ID": "o@AdobeOrg"}', "CLIENT_SECRETS"),
    ],
)
def test_import_errors_are_clear(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "dl.json"
    path.write_bytes(content)
    out = imsd("import", str(path), "--dir", str(tmp_path / "creds"))
    assert out.returncode == 1
    assert needle in out.stderr
    assert not (tmp_path / "creds").exists() or not any((tmp_path / "creds").iterdir())


def _import_env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "IMSD_CONFIG": "",
        "IMSD_OUTPUT_DIR": str(tmp_path / "out"),
        "IMSD_STATE_DIR": str(tmp_path / "state"),
        "IMSD_SOCKET": str(tmp_path / "imsd.sock"),
        "IMSD_METRICS_ADDRESS": "127.0.0.1:0",
    }


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--product", "aem"], "unknown product (aem, --product): choose among "),
        (["--product", "campaign"], "option 'tenant' is required (campaign, --option)"),
        (
            ["--product", "analytics", "--option", "analytics.company=acme"],
            "unknown option 'company' (allowed: company_id, discovery_url) (analytics, --option)",
        ),
        (["--option", "aep.sandbox=prod"], "add --product aep"),
        (["--product", "aep", "--option", "sandbox=prod"], "not PRODUCT.KEY=VALUE"),
    ],
)
def test_import_validates_products_and_options_before_writing(
    tmp_path: Path, extra: list[str], needle: str
) -> None:
    """What ``imsd check`` would reject, import refuses before writing anything: one line,
    exit 2 (a command-line mistake), no plugin debug lines, no directory created."""
    creds = tmp_path / "creds"
    out = subprocess.run(
        [sys.executable, "-m", "imsd", "import", str(FIXTURES / "oauth-s2s.json"), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        env={**_import_env(tmp_path), "IMSD_CREDENTIALS_DIR": str(creds)},
        check=False,
    )
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("imsd: ")
    assert needle in lines[0]
    assert not creds.exists()


def test_import_sets_product_options_and_creates_the_directory_0750(tmp_path: Path) -> None:
    creds = tmp_path / "etc" / "credentials"
    env = {**_import_env(tmp_path), "IMSD_CREDENTIALS_DIR": str(creds)}
    args = [sys.executable, "-m", "imsd", "import", str(FIXTURES / "oauth-s2s.json")]
    options = ["--product", "analytics", "--option", "analytics.company_id=acme"]
    out = subprocess.run(
        [*args, *options, "--product", "aep", "--option", "aep.sandbox=dev"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""  # no "[debug] plugin.loaded" lines
    assert out.stdout.splitlines()[0] == f"created {creds} (0750)"
    assert creds.stat().st_mode & 0o777 == 0o750
    table = tomllib.loads((creds / "oauth-s2s.toml").read_text())
    assert table["products"] == ["analytics", "aep"]
    assert table["product"] == {"analytics": {"company_id": "acme"}, "aep": {"sandbox": "dev"}}
    # What import accepted, check accepts.
    check = subprocess.run(
        [sys.executable, "-m", "imsd", "check"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    assert "(1 credential)" in check.stdout
    # An existing directory is neither announced nor changed.
    again = subprocess.run(
        [*args, "--name", "other"], capture_output=True, text=True, timeout=60, env=env
    )
    assert again.returncode == 0, again.stderr
    assert "created" not in again.stdout


# -- OAuth user credentials (imsd login) ----------------------------------------------------

WEBAPP_SECRET = "p8e-FAKEWEBAPPFAKEWEBAPPFAKEWEB01"


def test_import_a_web_app_credential_for_imsd_login(tmp_path: Path) -> None:
    """A project's OAuth Web App credential becomes auth = "refresh_token" with its default
    redirect URI and a refresh_token_file for imsd login; its Single Page App twin (no
    refresh tokens from Adobe) is left out; the CLI says what to run next."""
    creds = tmp_path / "creds"
    r = imsd("import", str(FIXTURES / "project-webapp.json"), "--name", "user", "--dir", str(creds))
    assert r.returncode == 0, r.stderr
    assert "next: imsd login user " in r.stdout
    assert sorted(p.name for p in creds.iterdir()) == ["user.secret", "user.toml"]
    table = tomllib.loads((creds / "user.toml").read_text())
    assert {k: v for k, v in table.items() if k != "client_secret_file"} == {
        "auth": "refresh_token",
        "client_id": "abcdefabcdefabcdefabcdefabcdef01",
        "org_id": ORG,
        "scopes": ["openid", "AdobeID", "offline_access"],
        "redirect_uri": "https://localhost/imsd/callback",
        "refresh_token_file": "user.refresh_token",
    }
    assert (creds / "user.secret").read_text() == WEBAPP_SECRET + "\n"
    assert "imsd login user" in (creds / "user.toml").read_text()  # the file says so too


def test_import_mixes_server_and_user_credentials(tmp_path: Path) -> None:
    download = json.loads((FIXTURES / "project.json").read_bytes())
    webapp = json.loads((FIXTURES / "project-webapp.json").read_bytes())
    entries = download["project"]["workspace"]["details"]["credentials"]
    entries[:] = [entries[0], *webapp["project"]["workspace"]["details"]["credentials"]]
    files = plan_import(json.dumps(download).encode(), source="p.json")
    assert sorted(f.name for f in files) == [
        "p.S2S-credential.secret",
        "p.S2S-credential.toml",
        "p.Web-App.secret",
        "p.Web-App.toml",
    ]
    assert login_needed(files) == ["p.Web-App"]
    check_plan(tmp_path, files, auth_methods=load_registry().auth_methods)


def test_import_refuses_public_user_credentials_only(tmp_path: Path) -> None:
    download = json.loads((FIXTURES / "project-webapp.json").read_bytes())
    entries = download["project"]["workspace"]["details"]["credentials"]
    del entries[0]
    with pytest.raises(ImportFailed, match="Browser-app are Single Page App or Native App"):
        plan_import(json.dumps(download).encode(), source="spa.json")


# -- community config files (aepp, cjapy, aanalytics2) and the flat JWT download -----------


def _serve(fake: FakeIms, path: Path, key: rsa.RSAPrivateKey, metascopes: list[str]) -> None:
    """The fake IMS knows the client of the file at *path* (and its key, for JWT)."""
    obj = {k.lower(): v for k, v in json.loads(path.read_text()).items()}
    secrets = obj.get("secret") or obj.get("client_secret") or obj["client_secrets"]
    fake.state.add_client(
        obj.get("client_id") or obj["api_key"],
        secrets=[secrets] if isinstance(secrets, str) else secrets,
        scopes=[*SCOPES, "AdobeID", "openid"],
        org_id=obj["org_id"],
        technical_account_id=obj.get("tech_id") or obj.get("technical_account_id"),
        public_keys=[certificate(key)],
        metascopes=metascopes,
    )


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("fixture", "args", "expected", "metascopes"),
    [
        (
            "community/aepp-oauth.json",
            [],
            {
                "auth": "oauth_server_to_server",
                "products": ["aep"],
                "product": {"aep": {"sandbox": "dev"}},
            },
            [],
        ),
        (
            "community/aepp-jwt.json",
            [],
            {
                "auth": "jwt",
                "metascopes": ["ent_dataservices_sdk"],
                "product": {"aep": {"sandbox": "prod"}},
            },
            ["ent_dataservices_sdk"],
        ),
        ("community/cjapy-oauth.json", ["--product", "cja"], {"products": ["cja"]}, []),
        ("community/cjapy-console-keys.json", ["--secret-index", "1"], {"products": ["cja"]}, []),
        (
            "community/aanalytics2-oauth.json",
            [],
            {"products": ["analytics"], "product": {"analytics": {"company_id": "testco0"}}},
            [],
        ),
        (
            "community/aanalytics2-jwt.json",
            ["--product", "analytics", "--option", "analytics.company_id=testco0"],
            {"metascopes": ["ent_analytics_bulk_ingest_sdk"]},
            ["ent_analytics_bulk_ingest_sdk"],
        ),
        (
            "console/jwt.json",
            ["--private-key", "KEY", "--product", "cja"],
            {"metascopes": ["ent_dataservices_sdk", "ent_cja_sdk"], "products": ["cja"]},
            ["ent_dataservices_sdk", "ent_cja_sdk"],
        ),
        (
            "console/jwt.json",
            ["--private-key", "KEY", "--metascope", "ent_marketing_sdk"],
            {"metascopes": ["ent_marketing_sdk"]},
            ["ent_marketing_sdk"],
        ),
    ],
)
async def test_import_a_community_config_file_and_the_daemon_uses_it(
    tmp_path: Path,
    fake: FakeIms,
    fixture: str,
    args: list[str],
    expected: dict[str, Any],
    metascopes: list[str],
) -> None:
    """aepp, cjapy and aanalytics2 users' files (and the Console's flat JWT download, given its
    key): imsd import reads them, with the product of the tool that wrote them (aepp's
    sandbox-name, aanalytics2's company as options); the daemon gets a token with the result."""
    source = FIXTURES.parent / fixture
    work = tmp_path / "download"
    work.mkdir()
    shutil.copy(source, work / source.name)
    key = rsa_key()
    (work / "private.key").write_bytes(private_pem(key))  # pathToKey: next to the file
    _serve(fake, source, key, metascopes)
    s = make_settings(tmp_path, ims_url=fake.url, secret_roots=[work])
    args = [str(work / "private.key") if a == "KEY" else a for a in args]
    out = imsd(
        "import",
        str(work / source.name),
        "--name",
        "c",
        "--dir",
        str(s.credentials_dir),
        *args,
        secret_roots=work,
    )
    assert out.returncode == 0, out.stderr
    toml = (s.credentials_dir / "c.toml").read_text()
    table = tomllib.loads(toml)
    assert {k: table.get(k) for k in expected} == expected
    assert "p8e-" not in toml + out.stdout + out.stderr
    if "tech_id" in source.read_text():
        assert table["private_key_file"] == str(work / "private.key")  # resolved from the file
    assert await run_once(s, load_registry(), give_up_after=10) == 0
    assert fake.state.validate_token((s.output_dir / "c" / "token").read_text()) is not None


@pytest.mark.parametrize(
    ("content", "args", "status", "needle"),
    [
        (
            b'{"org_id": "o@AdobeOrg", "client_id": "x", "secret": "s", "scopes": "openid"}',
            [],
            2,
            "an aepp, cjapy or aanalytics2 config file names no product (",
        ),
        (
            b'{"org_id": "<orgID>", "client_id": "x", "secret": "s", "scopes": "openid", '
            b'"sandbox-name": "prod"}',
            [],
            1,
            "org_id: is still createConfigFile's placeholder",
        ),
        (
            b'{"org_id": "o@AdobeOrg", "client_id": "x", "secret": "s", "auth_code": "c", '
            b'"sandbox-name": "prod"}',
            [],
            1,
            "auth_code: aepp's oauthV1",
        ),
        (
            b'{"org_id": "o@AdobeOrg", "client_id": "x", "secret": "s", "tech_id": "t", '
            b'"sandbox-name": "prod"}',
            [],
            1,
            "a JWT credential needs its private key",
        ),
        ((FIXTURES / "jwt.json").read_bytes(), [], 1, "a JWT credential needs its private key"),
        (
            (FIXTURES / "jwt.json").read_bytes(),
            ["--private-key", "/nonexistent/private.key"],
            2,
            "pass --metascope NAME",
        ),
    ],
)
def test_import_community_errors_are_one_line(
    tmp_path: Path, content: bytes, args: list[str], status: int, needle: str
) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(content)
    out = imsd("import", str(path), "--dir", str(tmp_path / "creds"), *args)
    assert out.returncode == status, out.stderr
    [line] = out.stderr.splitlines()
    assert needle in line
    assert "p8e-" not in line
    assert not (tmp_path / "creds").exists()


# -- what import writes is what it meant (issue 23, item 8) ---------------------------------

#: A Console download's name as a hostile page would offer it: newlines end the header's
#: comment, `\u002f` stands for the `/` a file name cannot hold (TOML basic strings decode it).
ATTACK = (
    'aep-oauth\nims_url = "http:\\u002f\\u002f127.0.0.1:9"\n'
    'on_refresh = {command = ["\\u002fbin\\u002ftouch", "\\u002ftmp\\u002fimsd-pwned"]}\n#'
)
HOSTILE_NAMES = [
    ATTACK,
    'x\n[product.aep]\nsandbox = "evil"\n#',
    'x"]\n[section]\nims_url = "http:\\u002f\\u002f127.0.0.1:9" # ]',
    "x\r\nims_url = 'http:\\u002f\\u002f127.0.0.1:9'\r\n#",
    "x\x00\x7f\t\x1b[2J\u2028ims_url = 'http:\\u002f\\u002f127.0.0.1:9'\u2029\u202e\u0085\\",
    'x\\\nims_url = "\\u0068ttp:\\u002f\\u002f127.0.0.1:9"\n# \\u000a',
    "\U0001f600\ud800",  # an emoji and a lone surrogate (what os.fsdecode makes of bad bytes)
]
#: What an S2S import with --product aep --option aep.sandbox=prod means, and nothing else.
MEANT = {
    "auth": "oauth_server_to_server",
    "client_id": "0123456789abcdef0123456789abcdef",
    "client_secret_file": "aep.secret",
    "org_id": ORG,
    "scopes": SCOPES[:5],
    "products": ["aep"],
    "product": {"aep": {"sandbox": "prod"}},
}


def test_a_crafted_download_name_adds_no_field(tmp_path: Path) -> None:
    """The attack as it was: a download named with newlines put ims_url (the secret went
    there) and on_refresh (it ran as root) into the written credential. Now the name stays
    inside its comment line, escaped, and the file holds exactly what import meant."""
    download = tmp_path / (ATTACK + ".json")
    shutil.copy(FIXTURES / "oauth-s2s.json", download)
    creds = tmp_path / "creds"
    args = ["--name", "aep", "--product", "aep", "--option", "aep.sandbox=prod"]
    out = imsd("import", str(download), "--dir", str(creds), *args)
    assert out.returncode == 0, out.stderr
    text = (creds / "aep.toml").read_text()
    assert tomllib.loads(text) == MEANT
    header = text.splitlines()[0]
    assert header.startswith("# imported from aep-oauth\\u000aims_url = ")
    assert [line for line in text.splitlines() if line.startswith("#")] == [header]
    # And the daemon's own reading of it: the default IMS host, no command.
    check = subprocess.run(
        [sys.executable, "-m", "imsd", "check"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**_import_env(tmp_path), "IMSD_CREDENTIALS_DIR": str(creds)},
        check=False,
    )
    assert check.returncode == 0, check.stderr
    [cred] = parse_credentials(creds / "aep.toml", text.encode(), env={})
    assert cred.ims_url == "https://ims-na1.adobelogin.com"
    assert cred.on_refresh is None


@pytest.mark.parametrize("source", HOSTILE_NAMES, ids=range(len(HOSTILE_NAMES)))
def test_any_source_name_stays_in_its_comment(source: str) -> None:
    files = plan_import(
        (FIXTURES / "oauth-s2s.json").read_bytes(),
        source=f"/downloads/{source}.json",
        name="aep",
        product="aep",
        options={"aep": {"sandbox": "prod"}},
    )
    [toml] = [f for f in files if f.name == "aep.toml"]
    text = toml.data.decode()
    assert tomllib.loads(text) == MEANT
    assert sum(line.startswith("#") for line in text.splitlines()) == 1
    assert text.isascii() or "\U0001f600" in text  # every control character escaped


@pytest.mark.parametrize(
    "value",
    [
        'prod"\nims_url = "http://127.0.0.1:9"',
        "prod'''\n[on_refresh]\ncommand = ['/bin/sh']",
        "prod\\\n\x00\x7f\u2028\U0001f600",
    ],
)
def test_option_values_and_keys_are_escaped(value: str) -> None:
    """--option values (and a community file's own options) go into the file escaped too."""
    files = plan_import(
        (FIXTURES / "oauth-s2s.json").read_bytes(),
        source="aep.json",
        product="aep",
        options={"aep": {"sandbox": value, 'k"]\n[x]\ny = "': value}},
    )
    [toml] = [f for f in files if f.name == "aep.toml"]
    table = tomllib.loads(toml.data.decode())
    assert table["product"] == {"aep": {"sandbox": value, 'k"]\n[x]\ny = "': value}}
    assert "ims_url" not in table
    assert "on_refresh" not in table


def test_bytes_that_read_back_otherwise_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The last guard: the daemon's reader must give back what import meant, key for key,
    or nothing is written (here a writer that adds a line)."""
    real = tomli_w.dumps
    monkeypatch.setattr(
        tomli_w, "dumps", lambda doc: real(doc) + 'ims_url = "http://127.0.0.1:9"\n'
    )
    with pytest.raises(ImportFailed) as e:
        plan_import((FIXTURES / "oauth-s2s.json").read_bytes(), source="aep.json")
    assert str(e.value) == "aep.toml: ims_url would read back differently: not written"
    monkeypatch.setattr(tomli_w, "dumps", lambda doc: real(doc) + "[product.x\n")
    with pytest.raises(ImportFailed, match=r"^aep.toml: would not read back \(invalid TOML: "):
        plan_import((FIXTURES / "oauth-s2s.json").read_bytes(), source="aep.json")


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        (".hidden", "'.hidden' (--name): a credential name is 1-64 of A-Z a-z 0-9 . _ -"),
        ("a/b", "'a/b' (--name)"),
        ("x" * 65, "(--name): a credential name is 1-64"),
        ("aep\n", "'aep\\n' (--name)"),
    ],
)
def test_import_names_follow_the_credential_name_rule(
    tmp_path: Path, name: str, needle: str
) -> None:
    out = imsd("import", str(FIXTURES / "oauth-s2s.json"), "--name", name, "--dir", str(tmp_path))
    assert out.returncode == 1
    [line] = out.stderr.splitlines()
    assert needle in line
    assert not any(tmp_path.iterdir())


def test_derived_names_never_collide() -> None:
    """A project's credentials are STEM.LABEL cut at 64 characters: two that would be cut to
    one name are refused (the second file would have replaced the first)."""
    download = json.loads((FIXTURES / "project.json").read_bytes())
    entries = download["project"]["workspace"]["details"]["credentials"]
    first = next(c for c in entries if c["name"] == "S2S credential")
    second = json.loads(json.dumps(first))
    second["name"] = "S2S credential two"
    second["oauth_server_to_server"]["client_id"] = "another-client"
    entries[:] = [first, second]
    stem = "p" * 55
    with pytest.raises(ImportFailed, match=rf"two credentials would be named alike \({stem}\."):
        plan_import(json.dumps(download).encode(), source="project.json", name=stem)
    names = [f.name for f in plan_import(json.dumps(download).encode(), source="project.json")]
    assert sorted(names) == [
        "project.S2S-credential-two.secret",
        "project.S2S-credential-two.toml",
        "project.S2S-credential.secret",
        "project.S2S-credential.toml",
    ]


#: Any text a Python str can hold, lone surrogates included (comments escape them).
SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=())
ANY_TEXT = st.text(st.one_of(st.characters(), SURROGATE))


@given(value=st.text(), key=st.text(), note=ANY_TEXT)
def test_any_string_round_trips_through_the_writer_and_the_daemons_reader(
    value: str, key: str, note: str
) -> None:
    """Every string a TOML file can hold (values, keys, table names) reads back from
    imsd.tomlfile's bytes, through the daemon's reader, as it was; a comment of any text
    adds nothing."""
    doc: dict[str, Any] = {
        "client_id": value,
        "scopes": [value, key],
        key: value,
        "product": {key: {key: value, "sandbox": [value]}},
        "template": [{"destination": key, "content": value}],
    }
    path = Path("c.toml")
    data = tomlfile.render(path, doc, comments=[note, value, key])
    assert decode(path, data) == doc
    assert data.count(b"\n#") + data.startswith(b"#") == 3  # one line per comment


@given(value=st.tuples(ANY_TEXT, SURROGATE, ANY_TEXT).map("".join))
def test_a_value_toml_cannot_hold_is_refused_in_one_line(value: str) -> None:
    with pytest.raises(tomlfile.UnfaithfulWrite) as e:
        tomlfile.render(Path("c.toml"), {"client_id": value})
    assert str(e.value) == "c.toml: cannot be written as TOML (UnicodeEncodeError)"
