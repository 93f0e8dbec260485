"""Auth methods (imsd_plugins.auth, reached through the plugin registry): the flows as pure
generators, the fake IMS's JWT checks, and each method end to end against the fake IMS."""

from __future__ import annotations

import datetime as dt
import functools
import importlib
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from imsd import logs
from imsd.credentials import builtin_auth_methods, parse_credentials
from imsd.daemon import Daemon, run_once
from imsd.fakeims.jwtcheck import Binding, Refused, check_assertion
from imsd.fakeims.server import FakeIms
from imsd.flows import credential_view
from imsd.model import Credential, CredentialError, HttpResponse, ImsError, ImsErrorKind, Secret
from imsd.persist import StateFile
from imsd.plugin import CredentialView
from imsd.registry import load_registry

from tests.support import (
    ORG,
    SECRET,
    TECH,
    certificate,
    force_refresh,
    live,
    make_settings,
    private_pem,
    rsa_key,
    wait_for,
)

NOW = 1_800_000_000.0
IMS = "http://ims.test"


def method(name: str) -> Any:
    return builtin_auth_methods()[name]


def cred(auth: str, **options: Any) -> CredentialView:
    """What a flow receives (the public view, never the daemon's Credential)."""
    return CredentialView(
        name="c",
        auth=auth,
        client_id="cid",
        client_secret=Secret(SECRET),
        org_id=ORG,
        scopes=(),
        ims_url="https://ims-na1.adobelogin.com",
        options=options,
    )


def ok(body: dict[str, Any]) -> HttpResponse:
    return HttpResponse(200, {}, json.dumps(body).encode())


def finish(flow: Any, response: HttpResponse) -> Any:
    with pytest.raises(StopIteration) as stop:
        flow.send(response)
    return stop.value.value


# -- flows, pure -------------------------------------------------------------------------------


def test_builtin_methods_are_registered_by_entry_point() -> None:
    reg = load_registry()
    assert set(reg.auth_methods) >= {"oauth_server_to_server", "jwt", "refresh_token"}
    info = next(p for p in reg.plugins if "jwt" in p.auth_methods)
    assert info.source.endswith("imsd_plugins.auth")


def test_jwt_flow_signs_the_documented_assertion() -> None:
    key = rsa_key()
    c = cred(
        "jwt",
        technical_account_id=TECH,
        metascopes=("ent_dataservices_sdk", "ent_analytics_bulk_ingest_sdk"),
        private_key=Secret(private_pem(key).decode()),
    )
    flow = method("jwt").flow(c, NOW, None)
    req = next(flow)
    assert (req.method, req.url) == ("POST", "https://ims-na1.adobelogin.com/ims/exchange/jwt")
    assert set(req.form) == {"client_id", "client_secret", "jwt_token"}
    claims = jwt.decode(
        req.form["jwt_token"],
        key.public_key(),
        algorithms=["RS256"],
        audience="https://ims-na1.adobelogin.com/c/cid",
        options={"verify_exp": False},
    )
    assert claims["iss"] == ORG
    assert claims["sub"] == TECH
    assert claims["exp"] == int(NOW) + 300
    assert claims["https://ims-na1.adobelogin.com/s/ent_dataservices_sdk"] is True
    assert claims["https://ims-na1.adobelogin.com/s/ent_analytics_bulk_ingest_sdk"] is True
    assert claims["jti"]
    # /ims/exchange/jwt answers expires_in in milliseconds.
    grant = finish(flow, ok({"access_token": "at", "token_type": "bearer", "expires_in": 86399999}))
    assert grant.expires_at - NOW == pytest.approx(86399.999)
    # Every exchange gets a fresh jti (IMS refuses a replay).
    again = next(method("jwt").flow(c, NOW, None)).form["jwt_token"]
    assert jwt.decode(again, options={"verify_signature": False})["jti"] != claims["jti"]


def test_refresh_flow_uses_the_newest_token_and_returns_the_rotated_one() -> None:
    c = cred("refresh_token", refresh_token=Secret("rt-from-file"))
    flow = method("refresh_token").flow(c, NOW, None)
    req = next(flow)
    assert req.url.endswith("/ims/token/v3")
    assert req.form["grant_type"] == "refresh_token"
    assert req.form["refresh_token"] == "rt-from-file"
    body = {"access_token": "at", "refresh_token": "rt-2", "expires_in": 86399}
    grant = finish(flow, ok(body))
    assert grant.refresh_token == Secret("rt-2")
    assert grant.expires_at - NOW == 86399
    # The daemon passes the persisted newest token back; it wins over the file's.
    req = next(method("refresh_token").flow(c, NOW, Secret("rt-2")))
    assert req.form["refresh_token"] == "rt-2"


def test_invalid_grant_says_a_new_login_is_needed() -> None:
    flow = method("refresh_token").flow(cred("refresh_token", refresh_token=Secret("x")), NOW, None)
    next(flow)
    body = json.dumps({"error": "invalid_grant", "error_description": "nope"}).encode()
    with pytest.raises(ImsError) as err:
        flow.send(HttpResponse(400, {}, body))
    assert err.value.kind is ImsErrorKind.PERMANENT
    assert err.value.code == "invalid_grant"
    assert "new login is needed" in str(err.value)


def test_a_plugin_flow_that_raises_becomes_a_transient_error() -> None:
    from imsd.exchange import _step

    def broken(secret: str) -> Any:
        raise RuntimeError(f"oops {secret}")
        yield

    with pytest.raises(ImsError) as err:
        _step(broken(SECRET), None)
    assert err.value.kind is ImsErrorKind.TRANSIENT
    assert SECRET not in str(err.value)
    assert "RuntimeError" in str(err.value)


# -- credential files --------------------------------------------------------------------------


def parse(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[Credential]:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return parse_credentials(path, text.encode(), env=env or {})


BASE = f'client_id = "cid"\nclient_secret = "{SECRET}"\norg_id = "{ORG}"\n'
J = f'auth = "jwt"\ntechnical_account_id = "{TECH}"\n'
JM = J + 'metascopes = ["m"]\n'


@pytest.mark.parametrize(
    ("extra", "field", "needle"),
    [
        ('auth = "password"\n', "auth", "unknown auth method 'password'"),
        ('auth = "jwt"\nmetascopes = ["m"]\nprivate_key_file = "k"\n', "technical_account_id", "jwt"),  # noqa: E501
        (J + 'private_key_file = "k"\n', "metascopes", "required"),
        (JM, "private_key_file", "required"),
        (JM + 'private_key_file = "nokey"\n', "private_key_file", "file not found"),
        (JM + 'private_key = "not a key"\n', "private_key", "not a PEM private key"),
        ('auth = "refresh_token"\n', "refresh_token_file", "required"),
        ('scopes = ["o"]\nrefresh_token_file = "rt"\n', "refresh_token_file", "'refresh_token'"),
        ('scopes = ["openid"]\nprivate_kye_file = "k"\n', "private_kye_file", "did you mean 'private_key_file'?"),  # noqa: E501
        ("", "scopes", "at least one scope"),
    ],
)  # fmt: skip
def test_auth_field_errors_name_the_field(
    tmp_path: Path, extra: str, field: str, needle: str
) -> None:
    with pytest.raises(CredentialError) as err:
        parse(tmp_path, BASE + extra)
    assert err.value.field == field, str(err.value)
    assert needle in str(err.value)
    assert SECRET not in str(err.value)


def test_jwt_key_with_passphrase_and_digest_follows_the_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "private.key"
    key_file.write_bytes(private_pem(rsa_key(), b"open sesame"))
    (tmp_path / "pass").write_text("open sesame\n")
    text = BASE + (
        f'auth = "jwt"\ntechnical_account_id = "{TECH}"\nmetascopes = "ent_dataservices_sdk"\n'
        'private_key_file = "private.key"\nprivate_key_passphrase_file = "pass"\n'
    )
    [c] = parse(tmp_path, text)
    assert c.options["metascopes"] == ("ent_dataservices_sdk",)
    assert "open sesame" not in repr(c)
    (tmp_path / "pass").write_text("wrong\n")
    with pytest.raises(CredentialError, match="private_key_file: not a PEM private key"):
        parse(tmp_path, text)
    # A new key (same file name) is a changed credential with a new identity.
    (tmp_path / "pass").write_text("open sesame\n")
    key_file.write_bytes(private_pem(rsa_key(1), b"open sesame"))
    [c2] = parse(tmp_path, text)
    assert (c2.digest, c2.identity) != (c.digest, c.identity)


def test_an_encrypted_key_is_loaded_once_when_the_file_is_read_not_per_refresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Installed as imsd_plugins (setuptools package-dir), which mypy's path does not map.
    auth_plugin: Any = importlib.import_module("imsd_plugins.auth")

    loads: list[bool] = []
    real = auth_plugin.load_key

    def counting(pem: bytes, passphrase: bytes | None = None) -> Any:
        loads.append(passphrase is not None)
        return real(pem, passphrase)

    monkeypatch.setattr(auth_plugin, "load_key", counting)
    (tmp_path / "private.key").write_bytes(private_pem(rsa_key(2), b"open sesame"))
    (tmp_path / "pass").write_text("open sesame\n")
    text = BASE + (
        f'auth = "jwt"\ntechnical_account_id = "{TECH}"\nmetascopes = "ent_dataservices_sdk"\n'
        'private_key_file = "private.key"\nprivate_key_passphrase_file = "pass"\n'
    )
    [c] = parse(tmp_path, text)
    assert loads == [True]  # in validate: the scan thread, off the event loop
    for i in range(3):  # refreshes sign with the loaded key: no key derivation again
        flow = auth_plugin.jwt_flow(credential_view(c), time.time() + i)
        request = next(flow)
        assert "jwt_token" in request.form
    assert loads == [True]


# -- the fake IMS's JWT checks, pure --------------------------------------------------------------


def assertion(
    *, key: rsa.RSAPrivateKey | None = None, extra: dict[str, Any] | None = None, **change: Any
) -> str:
    base = "http://ims.test"
    claims: dict[str, Any] = {
        "exp": int(NOW) + 300,
        "iss": ORG,
        "sub": TECH,
        "aud": f"{base}/c/cid",
        "jti": "j-1",
        f"{base}/s/ent_dataservices_sdk": True,
    }
    claims.update(change)
    claims.update(extra or {})
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, key or rsa_key(), algorithm="RS256")


BINDING = Binding("cid", ORG, TECH, [rsa_key().public_key()], {"ent_dataservices_sdk"})


@pytest.mark.parametrize(
    ("token", "code"),
    [
        (lambda: "", "invalid_token"),
        (lambda: "not.a.jwt", "invalid_token"),
        (lambda: assertion(key=rsa_key(1)), "invalid_signature"),
        (lambda: jwt.encode({"exp": 1}, "k" * 32, algorithm="HS256"), "invalid_signature"),
        (lambda: assertion(exp=int(NOW) - 1), "invalid_token"),
        (lambda: assertion(exp="soon"), "invalid_token"),
        (lambda: assertion(iss="other@AdobeOrg"), "bad_request"),
        (lambda: assertion(sub="other@techacct.adobe.com"), "bad_request"),
        (lambda: assertion(aud="http://ims.test/c/other"), "invalid_client"),
        (lambda: assertion(aud="https://elsewhere.test/c/cid"), "invalid_client"),
        (lambda: assertion(extra={f"{IMS}/s/ent_dataservices_sdk": None}), "invalid_scope"),
        (lambda: assertion(extra={f"{IMS}/s/ent_reactor_sdk": True}), "invalid_scope"),
    ],
)  # fmt: skip
def test_fake_ims_refuses_bad_assertions(token: Any, code: str) -> None:
    with pytest.raises(Refused) as err:
        check_assertion(token(), BINDING, origin="http://ims.test", now=NOW, seen_jti=set())
    assert err.value.code == code


def test_fake_ims_refuses_a_replayed_jti_and_a_missing_one_when_required() -> None:
    seen: set[str] = set()
    check_assertion(assertion(), BINDING, origin="http://ims.test", now=NOW, seen_jti=seen)
    with pytest.raises(Refused) as err:
        check_assertion(assertion(), BINDING, origin="http://ims.test", now=NOW, seen_jti=seen)
    assert err.value.code == "invalid_jti"
    strict = Binding("cid", ORG, TECH, BINDING.keys, {"ent_dataservices_sdk"}, require_jti=True)
    with pytest.raises(Refused) as err:
        check_assertion(assertion(jti=None), strict, origin=None, now=NOW, seen_jti=set())
    assert err.value.code == "invalid_jti"


# -- end to end against the fake IMS ---------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeIms]:
    # Not conftest's: a JWT client (technical account, certificate) and a user-login client.
    with FakeIms.in_thread() as f:
        f.state.add_client(
            "jwt-client",
            secrets=[SECRET],
            scopes=[],
            org_id=ORG,
            technical_account_id=TECH,
            public_keys=[certificate(rsa_key())],
            metascopes=["ent_dataservices_sdk"],
        )
        f.state.add_client(
            "web-client", secrets=[SECRET], scopes=["openid", "offline_access"], org_id=ORG
        )
        yield f


def write_jwt_cred(creds: Path, fake: FakeIms, key: rsa.RSAPrivateKey) -> None:
    creds.mkdir(exist_ok=True)
    (creds / "jwt.key").write_bytes(private_pem(key))
    (creds / "svc.toml").write_text(
        f'auth = "jwt"\nclient_id = "jwt-client"\nclient_secret = "{SECRET}"\n'
        f'org_id = "{ORG}"\ntechnical_account_id = "{TECH}"\n'
        f'metascopes = ["ent_dataservices_sdk"]\nprivate_key_file = "jwt.key"\n'
        f'ims_url = "{fake.url}"\n'
    )


@pytest.mark.anyio
async def test_jwt_end_to_end_and_deprecation_warning(tmp_path: Path, fake: FakeIms) -> None:
    stream = io.StringIO()
    logs.configure("info", "json", stream)
    try:
        s = make_settings(tmp_path)
        write_jwt_cred(s.credentials_dir, fake, rsa_key())
        assert await run_once(s, load_registry(), give_up_after=10) == 0
    finally:
        logs.configure("warning", "json")
    token = (s.output_dir / "svc" / "token").read_text()
    claims = fake.state.validate_token(token)
    assert claims is not None
    assert claims["client_id"] == "jwt-client"
    doc = json.loads((s.output_dir / "svc" / "token.json").read_text())
    lifetime = dt.datetime.fromisoformat(doc["expires_at"]).timestamp() - time.time()
    assert 86000 < lifetime <= 86400  # milliseconds understood as such
    warnings = [
        json.loads(line) for line in stream.getvalue().splitlines() if "auth.notice" in line
    ]
    assert warnings
    assert "2025-06-30" in warnings[0]["notice"]
    assert "migrate" in warnings[0]["notice"]
    assert [e.path for e in fake.state.request_log] == ["/ims/exchange/jwt"]


@pytest.mark.anyio
async def test_jwt_with_a_wrong_key_surfaces_invalid_signature(
    tmp_path: Path, fake: FakeIms
) -> None:
    s = make_settings(tmp_path)
    write_jwt_cred(s.credentials_dir, fake, rsa_key(1))  # not the certificate's key
    async with anyio.create_task_group() as tg:
        d = Daemon(s, load_registry(), env={})
        await tg.start(functools.partial(d.run, handle_signals=False))
        entry = live(d, "svc")
        assert entry is not None
        await wait_for(lambda: entry.last_error is not None)
        assert "invalid_signature" in (entry.last_error or "")
        assert entry.state(time.time()).value == "expired"
        tg.cancel_scope.cancel()
    assert not (s.output_dir / "svc" / "token").exists()


def write_refresh_cred(creds: Path, fake: FakeIms, token: str) -> Path:
    creds.mkdir(exist_ok=True)
    (creds / "user.rt").write_text(token + "\n")
    path = creds / "user.toml"
    path.write_text(
        f'auth = "refresh_token"\nclient_id = "web-client"\nclient_secret = "{SECRET}"\n'
        f'org_id = "{ORG}"\nrefresh_token_file = "user.rt"\nims_url = "{fake.url}"\n'
    )
    return path


@pytest.mark.anyio
async def test_refresh_token_rotation_survives_restarts(tmp_path: Path, fake: FakeIms) -> None:
    s = make_settings(tmp_path, min_refresh_interval=0.0)
    seed = fake.state.login("web-client", ["openid", "offline_access"])
    write_refresh_cred(s.credentials_dir, fake, seed)
    before = {p.name: p.read_bytes() for p in s.credentials_dir.iterdir()}
    tokens: list[str] = []
    for _run in range(3):  # a restart between rotations
        async with anyio.create_task_group() as tg:
            d = Daemon(s, load_registry(), env={})
            await tg.start(functools.partial(d.run, handle_signals=False))
            r = await force_refresh(d)
            assert r.status_code == 200, r.text
            tokens.append((s.output_dir / "user" / "token").read_text())
            tg.cancel_scope.cancel()
    # Each start and each forced refresh spent one refresh token; all succeeded.
    grants = [e for e in fake.state.request_log if e.grant_type == "refresh_token"]
    assert [e.status for e in grants] == [200] * len(grants)
    assert len(grants) >= 3
    assert len(set(tokens)) == 3
    assert fake.state.live_refresh_tokens() == 1  # only the newest is alive
    # Never written into the credentials dir (a read-only Secret volume works).
    assert {p.name: p.read_bytes() for p in s.credentials_dir.iterdir()} == before
    stored = StateFile(s.state_dir).load()["user"]
    assert stored.refresh_token is not None
    assert stored.refresh_token.reveal() != seed
    assert (s.state_dir / "state.db").stat().st_mode & 0o777 == 0o600


@pytest.mark.anyio
async def test_revoked_refresh_token_needs_a_new_login(tmp_path: Path, fake: FakeIms) -> None:
    s = make_settings(tmp_path, min_refresh_interval=0.0)
    path = write_refresh_cred(s.credentials_dir, fake, fake.state.login("web-client", ["openid"]))
    async with anyio.create_task_group() as tg:
        d = Daemon(s, load_registry(), env={})
        await tg.start(functools.partial(d.run, handle_signals=False))
        assert (s.output_dir / "user" / "token").exists()
        fake.state.revoke_refresh_tokens("web-client")
        r = await force_refresh(d)
        entry = live(d, "user")
        assert entry is not None
        assert "new login is needed" in (entry.last_error or "")
        assert r.status_code == 502
        assert "new login is needed" in r.json()["message"]
        # The new login: a new refresh token in the file starts a new chain at once.
        (path.parent / "user.rt").write_text(fake.state.login("web-client", ["openid"]))
        await wait_for(lambda: entry.last_error is None)
        tg.cancel_scope.cancel()
