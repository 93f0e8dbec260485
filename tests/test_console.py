from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from imsd import community
from imsd.console import ConsoleError, convert, detect, flat_jwt, is_flat_jwt

ORG = "0123456789ABCDEF01234567@AdobeOrg"
FLAT: dict[str, Any] = {
    "CLIENT_ID": "0123456789abcdef0123456789abcdef",
    "CLIENT_SECRETS": ["p8e-FIRST", "p8e-SECOND"],
    "TECHNICAL_ACCOUNT_ID": "ABCDEF0123456789ABCDEF01@techacct.adobe.com",
    "TECHNICAL_ACCOUNT_EMAIL": "x@techacct.adobe.com",
    "ORG_ID": ORG,
    "SCOPES": ["openid", "session", "AdobeID"],
}


def project(*creds: dict[str, Any]) -> dict[str, Any]:
    return {
        "project": {
            "id": "1",
            "name": "p",
            "org": {"id": "2", "ims_org_id": ORG},
            "workspace": {"id": "3", "name": "Production", "details": {"credentials": list(creds)}},
        }
    }


S2S: dict[str, Any] = {
    "id": "1",
    "name": "S2S credential",
    "integration_type": "oauth_server_to_server",
    "oauth_server_to_server": {
        "client_id": "cid",
        "client_secrets": ["p8e-S2S"],
        "technical_account_id": "t@techacct.adobe.com",
        "scopes": ["openid", "AdobeID"],
    },
}
JWT: dict[str, Any] = {
    "id": "2",
    "name": "Service Account (JWT)",
    "integration_type": "service",
    "jwt": {
        "client_id": "cid",
        "client_secret": "p8e-JWT",
        "technical_account_id": "t@techacct.adobe.com",
        "meta_scopes": ["ent_dataservices_sdk"],
    },
}


def test_flat_file_with_secret_index() -> None:
    assert detect(FLAT) == "console-s2s"
    [(name, table)] = convert(FLAT, stem="aep")
    assert name == "aep"
    assert table == {
        "auth": "oauth_server_to_server",
        "client_id": FLAT["CLIENT_ID"],
        "client_secret": "p8e-FIRST",
        "org_id": ORG,
        "scopes": ["openid", "session", "AdobeID"],
    }
    assert convert(FLAT, stem="aep", secret_index=1)[0][1]["client_secret"] == "p8e-SECOND"
    with pytest.raises(ConsoleError) as err:
        convert(FLAT, stem="aep", secret_index=2)
    assert err.value.field == "CLIENT_SECRETS"
    assert "p8e" not in str(err.value)


def test_project_prefers_s2s_over_its_jwt_twin() -> None:
    [(name, table)] = convert(project(JWT, S2S), stem="proj")
    assert name == "proj"
    assert table["auth"] == "oauth_server_to_server"
    assert table["org_id"] == ORG


def test_project_with_several_credentials_names_each() -> None:
    other = {**JWT, "jwt": {**JWT["jwt"], "client_id": "other"}}
    names = [n for n, _ in convert(project(S2S, other), stem="proj")]
    assert names == ["proj.S2S-credential", "proj.Service-Account-JWT"]


def test_aem_endpoint_becomes_the_ims_url() -> None:
    aem = {
        "ok": True,
        "integration": {
            "imsEndpoint": "ims-na1.adobelogin.com",
            "org": ORG,
            "id": "t@techacct.adobe.com",
            "technicalAccount": {"clientId": "cm-p1-e2", "clientSecret": "p8e-AEM"},
            "scopes": ["ent_aem_cloud_api"],
        },
    }
    [(_, table)] = convert(aem, stem="aem")
    assert table["ims_url"] == "https://ims-na1.adobelogin.com"
    assert table["auth"] == "oauth_server_to_server"


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({**FLAT, "ORG_ID": ""}, "ORG_ID"),
        ({k: v for k, v in FLAT.items() if k != "SCOPES"}, "SCOPES"),
        ({**FLAT, "CLIENT_SECRETS": []}, "CLIENT_SECRETS"),
        (project(), "project.workspace.details.credentials"),
        (
            project({"name": "key", "api_key": {"client_id": "x"}}),
            "project.workspace.details.credentials",
        ),
        ({"project": {"org": {}}}, "project.org.ims_org_id"),
    ],
)
def test_errors_name_the_json_path(obj: dict[str, Any], field: str) -> None:
    with pytest.raises(ConsoleError) as err:
        convert(obj, stem="x")
    assert err.value.field == field


@given(
    st.dictionaries(
        st.sampled_from(
            ["CLIENT_ID", "CLIENT_SECRETS", "ORG_ID", "SCOPES", "project", "integration", "other"]
        ),
        st.one_of(
            st.none(),
            st.text(),
            st.integers(),
            st.lists(st.text()),
            st.dictionaries(st.text(), st.text()),
        ),
    )
)
def test_fuzz_never_crashes(obj: dict[str, Any]) -> None:
    try:
        for name, table in convert(obj, stem="f"):
            assert name
            assert isinstance(table["client_id"], str)
    except ConsoleError:
        pass


# -- the community clients' config files (imsd.community) ----------------------------------

AEPP: dict[str, Any] = {
    "org_id": ORG,
    "client_id": "cid",
    "secret": "p8e-AEPP",
    "sandbox-name": "dev",
    "environment": "prod",
    "scopes": "openid, AdobeID,  read_organizations",
}


@pytest.mark.parametrize(
    ("obj", "tools"),
    [
        (AEPP, ("aepp",)),
        ({**AEPP, "Sandbox-Name": "x"}, ("aepp",)),  # aepp reads keys case-insensitively
        ({"ORG_ID": ORG, "api_key": "c", "CLIENT_SECRETS": ["p8e-1"], "SCOPES": []}, ("cjapy",)),
        (
            {"org_id": ORG, "client_id": "c", "secret": "s", "globalCompanyId": "x"},
            ("aanalytics2",),
        ),
        (
            {"org_id": ORG, "client_id": "c", "secret": "s", "tech_id": "t", "pathToKey": "k"},
            ("aepp", "cjapy", "aanalytics2"),
        ),
        ({"org_id": ORG, "client_id": "c", "client_secrets": ["p8e-1"], "scopes": "x"}, ("aepp",)),
        # native files, even with a typo: never a community file
        ({"org_id": ORG, "client_id": "c", "client_secret": "s", "scopes": "x"}, None),
        ({**AEPP, "auth": "oauth_server_to_server"}, None),
        ({**AEPP, "client_secret_file": "a.secret"}, None),
        ({"org_id": ORG, "secret": "s"}, None),
        (FLAT, None),  # the Console's: imsd.console reads it
    ],
)
def test_community_detect(obj: dict[str, Any], tools: tuple[str, ...] | None) -> None:
    found = detect(obj) or community.detect(obj)
    assert (found.tools if isinstance(found, community.Community) else None) == tools


def test_community_aepp_file_converts_with_its_sandbox_and_environment() -> None:
    found = community.detect(AEPP)
    assert found is not None
    assert found.label == "an aepp config file"
    converted = community.convert(AEPP, community=found)
    assert converted.table == {
        "client_id": "cid",
        "client_secret": "p8e-AEPP",
        "org_id": ORG,
        "auth": "oauth_server_to_server",
        "scopes": ["openid", "AdobeID", "read_organizations"],
    }
    assert (converted.products, converted.options) == (["aep"], {"aep": {"sandbox": "dev"}})
    stage = community.convert({**AEPP, "environment": "stage"}, community=found)
    assert stage.table["ims_url"] == "https://ims-na1-stg1.adobelogin.com"


def test_community_jwt_file_converts_with_its_key_path(tmp_path: Path) -> None:
    obj = {"org_id": ORG, "api_key": "c", "secret": "s", "tech_id": "t@techacct.adobe.com"}
    found = community.Community(("aanalytics2",))
    rel = community.convert({**obj, "pathToKey": "keys/p.key"}, community=found, key_dir=tmp_path)
    assert rel.table["private_key_file"] == str(tmp_path / "keys" / "p.key")
    assert rel.table["technical_account_id"] == "t@techacct.adobe.com"
    assert "metascopes" not in rel.table  # the files never held them
    absolute = community.convert({**obj, "pathToKey": "/k/p.key"}, community=found)
    assert absolute.table["private_key_file"] == "/k/p.key"
    assert rel.products == ["analytics"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"org_id": "<orgID>"}, "org_id"),
        ({"secret": "<YourSecret>"}, "secret"),
        ({"scopes": "<scopes>"}, "scopes"),
        ({"scopes": 3}, "scopes"),
        ({"secret": None}, "secret"),
        ({"client_id": None}, "client_id"),
        ({"scopes": None}, "scopes"),
        ({"scopes": None, "auth_code": "code"}, "auth_code"),
    ],
)
def test_community_errors_name_the_key_never_the_value(change: dict[str, Any], field: str) -> None:
    obj = {k: v for k, v in {**AEPP, **change}.items() if v is not None}
    with pytest.raises(community.CommunityError) as err:
        community.convert(obj, community=community.Community(("aepp",)))
    assert err.value.field == field
    assert "p8e" not in str(err.value)
    assert "<" not in str(err.value)


def test_flat_jwt_download() -> None:
    download = {
        "CLIENT_SECRET": "p8e-JWT",
        "ORG_ID": ORG,
        "API_KEY": "cid",
        "TECHNICAL_ACCOUNT_ID": "t@techacct.adobe.com",
        "PUBLIC_KEYS_WITH_EXPIRY": {"ab": "11/27/2027"},
    }
    assert is_flat_jwt(download)
    assert not is_flat_jwt(FLAT)
    assert flat_jwt(download, "svc") == [
        (
            "svc",
            {
                "auth": "jwt",
                "client_id": "cid",
                "client_secret": "p8e-JWT",
                "org_id": ORG,
                "technical_account_id": "t@techacct.adobe.com",
            },
        )
    ]
    with pytest.raises(ConsoleError, match="imsd import FILE --private-key"):
        convert(download, stem="svc")  # the daemon cannot use it as it is


@given(
    st.dictionaries(
        st.sampled_from(
            ["org_id", "client_id", "api_key", "secret", "client_secrets", "CLIENT_SECRETS",
             "scopes", "tech_id", "pathToKey", "sandbox-name", "environment", "auth_code",
             "globalCompanyId", "private_key"]
        ),
        st.one_of(st.none(), st.text(), st.integers(), st.lists(st.text())),
    )
)  # fmt: skip
def test_community_fuzz_never_crashes(obj: dict[str, Any]) -> None:
    found = community.detect(obj)
    if found is None:
        return
    assert community.import_hint(Path("/c/x.json"), found).startswith("looks like ")
    try:
        converted = community.convert(obj, community=found, secret_index=1)
    except community.CommunityError:
        return
    assert converted.table["auth"] in ("oauth_server_to_server", "jwt")
