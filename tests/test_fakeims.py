"""The fake IMS over real HTTP, as a client would see it (its gateway: test_gateway.py)."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator

import httpx
import pytest
from imsd.fakeims.app import gzip_bomb
from imsd.fakeims.server import FakeIms
from imsd.flows import parse_token_response
from imsd.model import HttpResponse

from tests.support import ORG

S1, S2 = "p8e-first-secret", "p8e-second-secret"
FORM = {
    "grant_type": "client_credentials",
    "client_id": "cid",
    "client_secret": S1,
    "scope": "openid, AdobeID",
}


@pytest.fixture
def fake() -> Iterator[FakeIms]:
    # Not conftest's: tests of the fake itself, with two secrets, a session scope and a fixed
    # token lifetime to check ``expires_in`` against.
    with FakeIms.in_thread(token_lifetime=3600) as f:
        f.state.add_client(
            "cid", secrets=[S1, S2], scopes=["openid", "AdobeID", "session"], org_id=ORG
        )
        yield f


@pytest.fixture
def client(fake: FakeIms) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.url, timeout=10) as c:
        yield c


def claims_of(token: str) -> dict[str, str]:
    import base64

    part = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))


@pytest.mark.parametrize(
    ("path", "factor"),
    [("/ims/token/v3", 1), ("/ims/token/v2/", 1), ("/ims/token/v1", 1000), ("/ims/token", 1)],
)
def test_token_endpoints_and_units(client: httpx.Client, path: str, factor: int) -> None:
    r = client.post(path, data=FORM)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert "x-debug-id" in r.headers
    body = r.json()
    assert body["expires_in"] == 3600 * factor
    claims = claims_of(body["access_token"])
    assert claims["type"] == "access_token"
    assert claims["client_id"] == "cid"
    assert claims["expires_in"] == "3600000"
    assert claims["created_at"].isdigit()
    assert claims["scope"] == "AdobeID,openid"
    # Only the claims IMS tokens are documented to carry (reference/ims-protocol.md §4, §9):
    # no exp/iat/iss/aud, and no org (a gateway learns it from the client).
    assert set(claims) == {
        "id",
        "type",
        "client_id",
        "user_id",
        "as",
        "scope",
        "created_at",
        "expires_in",
    }


def test_parameters_in_multipart_query_and_basic(client: httpx.Client) -> None:
    r = client.post("/ims/token/v3", files={k: (None, v) for k, v in FORM.items()})
    assert r.status_code == 200, r.text
    r = client.post(
        "/ims/token/v3",
        params={"client_id": "cid"},
        data={k: v for k, v in FORM.items() if k != "client_id"},
    )
    assert r.status_code == 200
    r = client.post(
        "/ims/token/v3",
        auth=("cid", S2),
        data={"grant_type": "client_credentials", "scope": "openid"},
    )
    assert r.status_code == 200


@pytest.mark.parametrize(
    ("change", "status", "error"),
    [
        ({"client_secret": "wrong"}, 401, "invalid_client"),
        ({"client_id": "nobody"}, 400, "invalid_client"),
        ({"scope": "openid,admin"}, 400, "invalid_scope"),
        ({"scope": ""}, 400, "invalid_request"),
        ({"grant_type": "password"}, 400, "unsupported_grant_type"),
        ({"client_secret": ""}, 400, "invalid_request"),
    ],
)
def test_errors_are_ims_shaped(
    client: httpx.Client, change: dict[str, str], status: int, error: str
) -> None:
    r = client.post("/ims/token/v3", data={**FORM, **change})
    assert r.status_code == status
    assert r.json()["error"] == error
    assert "error_description" in r.json()


def test_second_secret_accepted_during_rotation(client: httpx.Client, fake: FakeIms) -> None:
    assert client.post("/ims/token/v3", data={**FORM, "client_secret": S2}).status_code == 200
    fake.state.set_secrets("cid", [S2])
    assert client.post("/ims/token/v3", data=FORM).status_code == 401


def test_fault_switches_and_counters(client: httpx.Client, fake: FakeIms) -> None:
    fake.state.fail_next(2, status=503)
    assert [client.post("/ims/token/v3", data=FORM).status_code for _ in range(3)] == [
        503,
        503,
        200,
    ]
    fake.state.throttle_next(1, retry_after=7)
    r = client.post("/ims/token/v3", data=FORM)
    assert (r.status_code, r.headers["retry-after"]) == (429, "7")
    fake.state.reset_next(1)
    with pytest.raises(httpx.RemoteProtocolError):
        client.post("/ims/token/v3", data=FORM)
    assert client.post("/ims/token/v3", data=FORM).status_code == 200
    assert fake.state.request_count("cid") == 5  # resets never reach the token logic
    assert all(S1 not in repr(e) for e in fake.state.request_log)
    # The same controls over HTTP, for out-of-process tests.
    assert client.post("/_fake/faults", json={"fail": 1}).json() == {"ok": True}
    assert client.post("/ims/token/v3", data=FORM).status_code == 503
    assert client.get("/_fake/stats").json()["requests"] == 6


def test_bomb_and_drip_switches(client: httpx.Client, fake: FakeIms) -> None:
    """The hostile answers the IMS client must survive: a gzip bomb (sent whatever
    Accept-Encoding asked) and a body dripped one byte at a time."""
    fake.state.bomb_next(1)
    with client.stream("POST", "/ims/token/v3", data=FORM) as r:
        raw = b"".join(r.iter_raw())  # not decoded
    assert (r.status_code, r.headers["content-encoding"]) == (200, "gzip")
    assert raw == gzip_bomb()
    assert len(raw) < 200_000
    inflate = zlib.decompressobj(31)
    assert inflate.decompress(gzip_bomb(), 1 << 20) == bytes(1 << 20)
    assert inflate.unconsumed_tail  # far more where that came from
    assert client.post("/ims/token/v3", data=FORM).status_code == 200  # one bomb only
    fake.state.drip(0.001)
    with client.stream("POST", "/ims/token/v3", data={}) as r:
        pieces = list(r.iter_raw())
    fake.state.drip(0)
    assert r.headers["x-fake-drip"] == "0.001"
    assert json.loads(b"".join(pieces))["error"] == "invalid_request"
    assert len(pieces) > 10  # it came a byte or a few at a time
    assert client.post("/_fake/faults", json={"bomb": 1}).json() == {"ok": True}
    assert client.post("/ims/token/v3", data=FORM).headers["content-encoding"] == "gzip"


def test_rate_limit(client: httpx.Client, fake: FakeIms) -> None:
    fake.state.rate_limit(2, per=60)
    codes = [client.post("/ims/token/v3", data=FORM).status_code for _ in range(3)]
    assert codes == [200, 200, 429]


def test_validate_token_and_revoke(client: httpx.Client, fake: FakeIms) -> None:
    token = client.post("/ims/token/v3", data=FORM).json()["access_token"]
    r = client.post(
        "/ims/validate_token/v1",
        headers={"Authorization": f"Bearer {token}"},
        data={"type": "access_token", "client_id": "cid"},
    )
    assert r.json()["valid"] is True
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert fake.state.validate_token(forged) is None
    fake.state.revoke(token)
    assert fake.state.validate_token(token) is None


def test_daemon_side_parser_agrees(client: httpx.Client) -> None:
    r = client.post("/ims/token/v1", data=FORM)
    g = parse_token_response(HttpResponse(200, {}, r.content), now=0.0, unit="ms")
    assert g.lifetime == pytest.approx(3600)
