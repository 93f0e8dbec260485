from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from imsd.console import ConsoleError, convert, detect

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
