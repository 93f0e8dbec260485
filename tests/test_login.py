"""``imsd login``: the authorization-code flow's pure pieces, and the whole path a user takes
(``imsd login`` in a subprocess, the consent driven over HTTP as a browser would, the
refresh token file, the daemon minting with it and rotating it) against the fake IMS."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from imsd.daemon import Daemon
from imsd.fakeims.authorize import Registration
from imsd.fakeims.server import FakeIms
from imsd.login import (
    LoginError,
    LoginTarget,
    authorize_url,
    callback_code,
    code_request,
    loopback_address,
    pkce_pair,
    with_offline,
    with_port,
)
from imsd.model import Secret
from imsd.persist import StateFile

from tests.support import ORG, SCOPES, SECRET, force_refresh, live, wait_for

LOOPBACK = r"http://127\.0\.0\.1:\d+/callback"
PASTE = "https://localhost/imsd/callback"


# -- pure flow logic ------------------------------------------------------------------------


def test_pkce_s256() -> None:
    """RFC 7636 §4.2: BASE64URL(SHA256(verifier)), unpadded; the verifier 43+ unreserved
    characters (§4.1)."""
    verifier, challenge = pkce_pair()
    assert 43 <= len(verifier) <= 128
    assert re.fullmatch(r"[A-Za-z0-9_-]+", verifier)
    digest = hashlib.sha256(verifier.encode()).digest()
    assert challenge == base64.urlsafe_b64encode(digest).decode().rstrip("=")
    assert pkce_pair(verifier) == (verifier, challenge)
    assert pkce_pair()[0] != verifier


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("http://127.0.0.1:8400/callback", ("127.0.0.1", 8400, "/callback")),
        ("http://localhost:0/cb", ("127.0.0.1", 0, "/cb")),
        ("http://127.0.0.1:9/", ("127.0.0.1", 9, "/")),
        ("http://127.0.0.1/callback", None),  # port 80: not ours to bind
        ("https://localhost:8443/callback", None),  # TLS: we hold no certificate
        ("https://app.example.com/callback", None),
        ("http://192.168.1.2:8400/callback", None),
        ("http://127.0.0.1:99999/callback", None),
    ],
)
def test_loopback_address(uri: str, expected: tuple[str, int, str] | None) -> None:
    assert loopback_address(uri) == expected


def test_with_port_and_offline() -> None:
    assert with_port("http://localhost:0/cb?x=1", 5123) == "http://localhost:5123/cb?x=1"
    assert with_offline(("openid",)) == ("openid", "offline_access")
    assert with_offline(("offline_access", "a")) == ("offline_access", "a")


@pytest.mark.parametrize(
    ("answer", "result"),
    [
        ("https://localhost/cb?code=C1&state=S", "C1"),
        ("  https://localhost/cb?state=S&code=C2\n", "C2"),
        ("?code=C3&state=S", "C3"),
        ("code=C4&state=S", "C4"),
        ("https://localhost/cb?code=C1&state=T", "state does not match"),
        ("https://localhost/cb?code=C1", "state does not match"),
        (
            "https://localhost/cb?error=access_denied&state=S",
            "IMS refused the login: access_denied",
        ),
        ("https://localhost/cb?state=S", "has no code"),
        ("https://localhost/cb", "no code in what was pasted"),
        ("", "no code in what was pasted"),
    ],
)
def test_callback_code(answer: str, result: str) -> None:
    if result.startswith("C"):
        assert callback_code(answer, "S") == result
    else:
        with pytest.raises(LoginError, match=result):
            callback_code(answer, "S")


def _target(**changes: Any) -> LoginTarget:
    values: dict[str, Any] = {
        "name": "user",
        "client_id": "client-a",
        "client_secret": Secret(SECRET),
        "ims_url": "https://ims-na1.adobelogin.com/",
        "scopes": ("openid", "offline_access"),
        "redirect_uri": PASTE,
        "token_file": None,
    }
    values.update(changes)
    return LoginTarget(**values)


def test_authorize_url_and_code_request() -> None:
    url = httpx.URL(authorize_url(_target(), "the-state", "the-challenge"))
    assert (url.scheme, url.host, url.path) == (
        "https",
        "ims-na1.adobelogin.com",
        "/ims/authorize/v2",
    )
    assert dict(url.params) == {
        "client_id": "client-a",
        "redirect_uri": PASTE,
        "scope": "openid,offline_access",
        "state": "the-state",
        "response_type": "code",
        "code_challenge": "the-challenge",
        "code_challenge_method": "S256",
    }
    req = code_request(_target(), "the-code", "the-verifier")
    assert req.url == "https://ims-na1.adobelogin.com/ims/token/v3"
    assert dict(req.form) == {
        "grant_type": "authorization_code",
        "code": "the-code",
        "code_verifier": "the-verifier",
    }
    assert SECRET not in repr(req)
    assert SECRET not in repr(_target())
    assert req.headers["Authorization"].startswith("Basic ")


# -- end to end -----------------------------------------------------------------------------


@pytest.fixture
def user_fake(fake: FakeIms) -> FakeIms:
    """The shared fake, ``client-a`` registered as an OAuth Web App that allows loopback and
    ``https://localhost`` redirects."""
    fake.state.authorize.registrations["client-a"] = Registration(
        "https://localhost/imsd/default", f"{LOOPBACK},https://localhost/imsd/.*"
    )
    return fake


def _write_user(creds: Path, fake: FakeIms, redirect: str, *, secret: str = SECRET) -> Path:
    creds.mkdir(exist_ok=True)
    (creds / "user.secret").write_text(secret + "\n")
    path = creds / "user.toml"
    path.write_text(
        'auth = "refresh_token"\nclient_id = "client-a"\nclient_secret_file = "user.secret"\n'
        f'org_id = "{ORG}"\nscopes = {SCOPES!r}\nims_url = "{fake.url}"\n'
        f'refresh_token_file = "user.refresh_token"\nredirect_uri = "{redirect}"\n'.replace(
            "'", '"'
        )
    )
    return path


def _login(tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "imsd",
            "login",
            "user",
            "--no-browser",
            "--credentials-dir",
            str(tmp_path / "creds"),
            "--state-dir",
            str(tmp_path / "state"),
            "--timeout",
            "60",
            *extra,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _authorize_url(proc: subprocess.Popen[str], fake: FakeIms) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(fake.url):
            return line.strip()
    raise AssertionError(f"no URL printed; stderr: {proc.communicate()[1]}")


def _consent(url: str, approve: str = "yes") -> str:
    """What a browser does: open the authorize URL, submit the consent form; returns where
    IMS redirects it."""
    page = httpx.get(url)
    assert page.status_code == 200, page.text
    request = re.search(r'name="request" value="([^"]+)"', page.text)
    assert request is not None
    action = str(page.url.join("/ims/authorize/v2/consent"))
    answer = httpx.post(action, data={"request": request.group(1), "approve": approve})
    assert answer.status_code == 302
    return answer.headers["location"]


def _finish(proc: subprocess.Popen[str], stdin: str = "") -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(stdin, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


def _check_file(path: Path) -> str:
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    return path.read_text().strip()


def _login_through_loopback(tmp_path: Path, fake: FakeIms) -> str:
    """``imsd login`` with a loopback redirect (any port), the browser's part played over
    HTTP; returns the refresh token it wrote."""
    _write_user(tmp_path / "creds", fake, "http://127.0.0.1:0/callback")
    proc = _login(tmp_path)
    url = _authorize_url(proc, fake)
    assert "offline_access" in httpx.URL(url).params["scope"]
    location = _consent(url)
    assert location.startswith("http://127.0.0.1:")
    assert "code=" in location
    assert httpx.get(location).status_code == 200  # the browser reaches the listener
    code, out, err = _finish(proc)
    assert (code, err) == (0, "")
    first = (tmp_path / "creds" / "user.refresh_token").read_text().strip()
    assert first not in out
    return first


@pytest.mark.anyio
async def test_login_loopback_then_daemon_rotates(
    tmp_path: Path, user_fake: FakeIms, running: Callable[..., Awaitable[Daemon]]
) -> None:
    first = _login_through_loopback(tmp_path, user_fake)
    assert _check_file(tmp_path / "creds" / "user.refresh_token") == first

    d = await running(min_refresh_interval=0)
    await wait_for(lambda: live(d, "user").grant is not None)
    grants = [e.grant_type for e in user_fake.state.request_log]
    assert grants == ["authorization_code", "refresh_token"]
    rotated = live(d, "user").refresh_token
    assert rotated is not None
    assert rotated.reveal() != first
    assert (await force_refresh(d)).status_code == 200
    newest = live(d, "user").refresh_token
    assert newest not in (None, rotated)
    # Saved in the state directory before the token was published (the file is never written).
    assert StateFile(tmp_path / "state").load()["user"].refresh_token == newest
    assert (tmp_path / "creds" / "user.refresh_token").read_text().strip() == first
    assert user_fake.state.live_refresh_tokens() == 1  # each one spent on use


def test_login_paste_fallback(tmp_path: Path, user_fake: FakeIms) -> None:
    _write_user(tmp_path / "creds", user_fake, PASTE)
    proc = _login(tmp_path)
    location = _consent(_authorize_url(proc, user_fake))
    assert location.startswith(PASTE + "?")
    code, out, err = _finish(proc, location + "\n")
    assert (code, err) == (0, "")
    token = _check_file(tmp_path / "creds" / "user.refresh_token")
    assert user_fake.state.live_refresh_tokens() == 1
    assert token not in out


@pytest.mark.parametrize(
    ("approve", "mangle", "message"),
    [
        ("no", None, "IMS refused the login: access_denied (the user cancelled)"),
        ("yes", "state", "the answer's state does not match this login's"),
        ("yes", "code", "IMS refused the code: invalid_grant"),
    ],
)
def test_login_errors_are_one_line(
    tmp_path: Path, user_fake: FakeIms, approve: str, mangle: str | None, message: str
) -> None:
    _write_user(tmp_path / "creds", user_fake, PASTE)
    proc = _login(tmp_path)
    location = _consent(_authorize_url(proc, user_fake), approve)
    if mangle is not None:
        location = re.sub(rf"{mangle}=[^&]+", f"{mangle}=forged", location)
    code, _, err = _finish(proc, location + "\n")
    assert code == 1
    assert err.count("\n") == 1
    assert err.startswith("imsd: login failed (user): ")
    assert message in err
    assert not (tmp_path / "creds" / "user.refresh_token").exists()


def test_login_wrong_secret(tmp_path: Path, user_fake: FakeIms) -> None:
    _write_user(tmp_path / "creds", user_fake, PASTE, secret="p8e-wrong")
    proc = _login(tmp_path)
    location = _consent(_authorize_url(proc, user_fake))
    code, _, err = _finish(proc, location + "\n")
    assert code == 1
    assert "IMS refused the code: invalid_client" in err
    assert "p8e-wrong" not in err
    assert err.count("\n") == 1


def test_unknown_client_gets_no_redirect(user_fake: FakeIms) -> None:
    target = _target(client_id="nobody", ims_url=user_fake.url)
    r = httpx.get(authorize_url(target, "s", pkce_pair()[1]))
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_client"
    assert "location" not in r.headers


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no credential named user in"),
        ('auth = "oauth_server_to_server"', 'imsd login is for auth = "refresh_token"'),
        ("no-redirect", "redirect_uri is not set"),
    ],
)
def test_login_credential_problems(
    tmp_path: Path, user_fake: FakeIms, content: str | None, message: str
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    if content is not None:
        path = _write_user(creds, user_fake, PASTE)
        text = path.read_text()
        if content == "no-redirect":
            text = re.sub(r"redirect_uri = .*\n", "", text)
        else:
            text = re.sub(r"auth = .*\n", content + "\n", text)
            text = re.sub(r"(refresh_token_file|redirect_uri) = .*\n", "", text)
        path.write_text(text)
    code, _, err = _finish(_login(tmp_path))
    assert code == 2
    assert err.count("\n") == 1
    assert message in err


def test_daemon_says_to_log_in(tmp_path: Path, user_fake: FakeIms) -> None:
    _write_user(tmp_path / "creds", user_fake, PASTE)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "imsd",
            "check",
            "--credentials-dir",
            str(tmp_path / "creds"),
            "--state-dir",
            str(tmp_path / "state"),
            "--output-dir",
            str(tmp_path / "out"),
            "--socket",
            str(tmp_path / "s.sock"),
            "--metrics-address",
            "",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert "imsd login NAME obtains the first refresh token" in r.stderr


def test_import_then_login(tmp_path: Path, fake: FakeIms) -> None:
    """A Console project's Web App credential, imported, is one imsd login away from use."""
    client = "abcdefabcdefabcdefabcdefabcdef01"  # tests/fixtures/console/project-webapp.json
    fake.state.add_client(
        client, secrets=["p8e-FAKEWEBAPPFAKEWEBAPPFAKEWEB01"], scopes=SCOPES, org_id=ORG
    )
    fake.state.authorize.registrations[client] = Registration(PASTE, r"https://localhost/imsd/.*")
    download = Path(__file__).parent / "fixtures" / "console" / "project-webapp.json"
    creds = str(tmp_path / "creds")
    imported = subprocess.run(
        [sys.executable, "-m", "imsd", "import", str(download), "--name", "user", "--dir", creds],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "next: imsd login user" in imported.stdout, imported.stderr
    proc = _login(tmp_path, "--ims-url", fake.url)
    location = _consent(_authorize_url(proc, fake))
    code, _, err = _finish(proc, location + "\n")
    assert (code, err) == (0, "")
    assert _check_file(tmp_path / "creds" / "user.refresh_token")
