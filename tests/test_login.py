"""``imsd login``: the authorization-code flow's pure pieces, and the whole path a user takes
(``imsd login`` in a subprocess, the consent driven over HTTP as a browser would, the
refresh token file, the daemon minting with it and rotating it) against the fake IMS."""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import html
import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from imsd.daemon import Daemon
from imsd.fakeims.authorize import Registration
from imsd.fakeims.server import FakeIms
from imsd.login import (
    Identity,
    LoginError,
    LoginTarget,
    authorize_url,
    callback_code,
    carries_state,
    code_request,
    identity_of,
    loopback_address,
    pkce_pair,
    with_offline,
    with_port,
)
from imsd.model import HttpResponse, Secret
from imsd.persist import StateFile

from tests.support import ORG, SCOPES, SECRET, force_refresh, live, wait_for
from tests.test_attacks import SYSTEM_PYTHON, User, make_user  # noqa: F401

LOOPBACK = r"http://(127\.0\.0\.1|localhost|\[::1\]):\d+/callback"
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
        ("http://127.0.0.1:8400/callback", (("127.0.0.1",), 8400, "/callback")),
        ("http://localhost:0/cb", (("127.0.0.1", "::1"), 0, "/cb")),  # browsers try ::1 first
        ("http://[::1]:8400/cb", (("::1",), 8400, "/cb")),
        ("http://127.0.0.1:9/", (("127.0.0.1",), 9, "/")),
        ("http://127.0.0.1/callback", None),  # port 80: not ours to bind
        ("https://localhost:8443/callback", None),  # TLS: we hold no certificate
        ("https://app.example.com/callback", None),
        ("http://192.168.1.2:8400/callback", None),
        ("http://127.0.0.1:99999/callback", None),
    ],
)
def test_loopback_address(uri: str, expected: tuple[tuple[str, ...], int, str] | None) -> None:
    assert loopback_address(uri) == expected


def test_with_port_and_offline() -> None:
    assert with_port("http://localhost:0/cb?x=1", 5123) == "http://localhost:5123/cb?x=1"
    assert with_port("http://[::1]:0/cb", 5123) == "http://[::1]:5123/cb"
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


def test_carries_state() -> None:
    assert carries_state("https://localhost/cb?code=C&state=S", "S")
    assert carries_state("code=C&state=S", "S")
    assert not carries_state("code=C&state=T", "S")
    assert not carries_state("code=C", "S")
    assert not carries_state("", "S")


def _jwt(claims: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2ln"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {"id_token": _jwt({"sub": "A@AdobeID", "email": "a@example.com"}), "sub": "B@AdobeID"},
            Identity("A@AdobeID", "a@example.com"),
        ),
        (
            {"sub": "B@AdobeID", "access_token": _jwt({"user_id": "C@AdobeID"})},
            Identity("B@AdobeID", None),
        ),
        ({"access_token": _jwt({"user_id": "C@AdobeID"})}, Identity("C@AdobeID", None)),
        ({"id_token": "not-a-jwt", "sub": ["B"], "access_token": "x"}, Identity(None, None)),
        ({"sub": "B\x1b[2J@AdobeID"}, Identity(None, None)),  # not printable: not shown
        ([], Identity(None, None)),
    ],
)
def test_identity_of(body: object, expected: Identity) -> None:
    assert identity_of(HttpResponse(200, {}, json.dumps(body).encode())) == expected


def test_identity_matches() -> None:
    who = Identity("A@AdobeID", "Ann@Example.com")
    assert who.matches("A@AdobeID")
    assert who.matches(" ann@example.com ")
    assert not who.matches("a@adobeid")  # ids are compared exactly
    assert not who.matches("B@AdobeID")
    assert not Identity(None, None).matches("A@AdobeID")
    assert str(who) == "A@AdobeID (Ann@Example.com)"


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


def _login(
    tmp_path: Path, *extra: str, env: dict[str, str] | None = None, no_browser: bool = True
) -> subprocess.Popen[str]:
    """``imsd login user`` with *extra*; ``no_browser=False``: without ``--no-browser``, as a
    user types it."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "imsd",
            "login",
            "user",
            *(["--no-browser"] if no_browser else []),
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
        env=env,
    )


def _authorize_url(proc: subprocess.Popen[str], fake: FakeIms) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(fake.url):
            return line.strip()
    raise AssertionError(f"no URL printed; stderr: {proc.communicate()[1]}")


def _consent(url: str, approve: str = "yes", user: str = "") -> str:
    """What a browser does: open the authorize URL, submit the consent form (as *user*, the
    account that logs in: default a new one); returns where IMS redirects it."""
    page = httpx.get(url)
    assert page.status_code == 200, page.text
    request = re.search(r'name="request" value="([^"]+)"', page.text)
    assert request is not None
    action = str(page.url.join("/ims/authorize/v2/consent"))
    form = {"request": request.group(1), "approve": approve, "user": user}
    answer = httpx.post(action, data=form)
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
    location = _consent(_authorize_url(proc, user_fake), user="ANN0123@AdobeID")
    assert location.startswith(PASTE + "?")
    code, out, err = _finish(proc, location + "\n")
    assert (code, err) == (0, "")
    token = _check_file(tmp_path / "creds" / "user.refresh_token")
    assert user_fake.state.live_refresh_tokens() == 1
    assert token not in out
    # Whose account it is, said before it was stored.
    said = out.index("the refresh token is for IMS user ANN0123@AdobeID\n")
    assert said < out.index("wrote the refresh token to ")


# -- item 6 of issue 23: the authorize URL off argv; the code bound to the expected user ----


def test_expect_user_refuses_another_account(tmp_path: Path, user_fake: FakeIms) -> None:
    """Someone who learned the authorize URL consents with their own account and delivers
    that code: state and PKCE match (it is this login's URL), the account does not."""
    _write_user(tmp_path / "creds", user_fake, PASTE)
    proc = _login(tmp_path, "--expect-user", "ANN0123@AdobeID")
    location = _consent(_authorize_url(proc, user_fake), user="MALLORY99@AdobeID")
    code, out, err = _finish(proc, location + "\n")
    assert code == 1
    assert err == (
        "imsd: login failed (user): the account that consented is MALLORY99@AdobeID, "
        "not ANN0123@AdobeID (--expect-user): nothing was stored; log in as that user\n"
    )
    assert not (tmp_path / "creds" / "user.refresh_token").exists()

    proc = _login(tmp_path, "--expect-user", "ANN0123@AdobeID")
    location = _consent(_authorize_url(proc, user_fake), user="ANN0123@AdobeID")
    code, out, err = _finish(proc, location + "\n")
    assert (code, err) == (0, "")
    assert "the refresh token is for IMS user ANN0123@AdobeID\n" in out
    assert _check_file(tmp_path / "creds" / "user.refresh_token")


LAUNCHER = """#!/bin/sh
# A browser launcher, as Python's webbrowser runs one ($BROWSER): records its pid and argv,
# stays alive (so its /proc/PID/cmdline can be read) until the test removes DIR/keep.
exec </dev/null >/dev/null 2>&1  # let go of imsd login's pipes
DIR=%s
printf '%%s\\n' "$@" > "$DIR/argv.tmp" && mv "$DIR/argv.tmp" "$DIR/argv"
echo $$ > "$DIR/pid.tmp" && mv "$DIR/pid.tmp" "$DIR/pid"
while [ -e "$DIR/keep" ]; do sleep 0.05; done
"""


def _as_other(user: User, code: str, *args: str) -> subprocess.Popen[str]:
    """The system Python running *code* as the other local *user* (``make_user``), piped."""
    assert SYSTEM_PYTHON is not None
    return subprocess.Popen(
        [SYSTEM_PYTHON, "-I", "-c", code, *args],
        user=user.uid,
        group=user.gid,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )


def _launcher(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    record = tmp_path / "launcher"
    record.mkdir()
    (record / "keep").touch()
    script = record / "launch"
    script.write_text(LAUNCHER % record)
    script.chmod(0o700)
    return record, {**os.environ, "BROWSER": str(script), "DISPLAY": ""}


def test_browser_gets_a_private_page_never_the_url_on_argv(
    tmp_path: Path, user_fake: FakeIms
) -> None:
    """``--browser``: the launcher's command line (``/proc/PID/cmdline``, readable by every
    local user) names a 0600 page in a 0700 directory, which sends the browser on."""
    record, env = _launcher(tmp_path)
    _write_user(tmp_path / "creds", user_fake, "http://127.0.0.1:0/callback")
    proc = _login(tmp_path, "--browser", env=env)
    try:
        url = _authorize_url(proc, user_fake)
        assert _launched(record, 30), "the launcher did not run"
        pid = int((record / "pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
        secret_parts = [httpx.URL(url).params[k] for k in ("state", "code_challenge")]
        assert all(part not in cmdline for part in secret_parts), cmdline
        assert "authorize" not in cmdline
        page = Path(httpx.URL((record / "argv").read_text().strip()).path)
        assert page.as_uri() in cmdline
        assert stat.S_IMODE(page.stat().st_mode) == 0o600
        assert stat.S_IMODE(page.parent.stat().st_mode) == 0o700
        # The browser follows the page to the authorize URL.
        target = re.search(r'http-equiv="refresh" content="0;url=([^"]+)"', page.read_text())
        assert target is not None
        assert html.unescape(target.group(1)) == url
        location = _consent(url)
        assert httpx.get(location).status_code == 200
        code, _, err = _finish(proc)
        assert (code, err) == (0, "")
        assert not page.parent.exists()  # removed when the login ended
    finally:
        (record / "keep").unlink()


# What another local user does while a login waits: read every process's command line
# (/proc/PID/cmdline is world-readable) and every file a command line names, looking for an
# authorize URL. One "scan" line on stdin, one line out: the URL, or "nothing".
SCAN_PROC = r"""
import html, os, re, sys
URL = re.compile(r"https?://[^\s\"'<>]*code_challenge=[^\s\"'<>]*")

def scan():
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        for arg in args:
            found = URL.search(arg)
            if found:
                return found.group(0)
            path = arg[len("file://"):] if arg.startswith("file://") else arg
            try:
                if path.startswith("/") and os.path.isfile(path):
                    with open(path, errors="replace") as f:
                        found = URL.search(html.unescape(f.read(65536)))
                    if found:
                        return found.group(0)
            except OSError:
                pass
    return "nothing"

print("ready", flush=True)
for line in sys.stdin:
    print(scan(), flush=True)
"""


def _refresh_token_user(token: str) -> str:
    """The IMS user a (fake IMS) refresh token was issued to: its ``user_id`` claim."""
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    user: str = claims["user_id"]
    return user


@pytest.mark.parametrize("mode", [(), ("--browser",)], ids=["default", "browser"])
def test_another_user_cannot_hijack_the_login_from_proc(
    tmp_path: Path,
    user_fake: FakeIms,
    make_user: Any,  # noqa: F811
    mode: tuple[str, ...],
) -> None:
    """The attack of issue 23 item 6: while ``imsd login`` waits, another local user reads
    the browser launcher's command line (and any file it names), consents with *their* IMS
    account on the authorize URL found there, and delivers that code to the listener first.
    The login must leave them nothing to find, and store the logged-in user's token."""
    assert SYSTEM_PYTHON is not None
    mallory = make_user()
    record, env = _launcher(tmp_path)
    scanner = _as_other(mallory, SCAN_PROC)
    _write_user(tmp_path / "creds", user_fake, "http://127.0.0.1:0/callback")
    proc = _login(tmp_path, *mode, env=env, no_browser=False)
    try:
        assert scanner.stdin is not None
        assert scanner.stdout is not None
        assert scanner.stdout.readline() == "ready\n", scanner.stderr
        url = _authorize_url(proc, user_fake)
        # The launcher, if the login starts one, runs (and stays) before the scan; with
        # --browser it must start. The default starts none: 3 s of slack for one to appear.
        launched = _launched(record, 30.0 if mode else 3.0)
        scanner.stdin.write("scan\n")
        scanner.stdin.flush()
        found = scanner.stdout.readline().strip()
        if found != "nothing":  # the attack: Mallory's account, delivered first
            hijack = _consent(found, user="MALLORY99@AdobeID")
            httpx.get(hijack)
        location = _consent(url, user="ANN0123@AdobeID")
        with contextlib.suppress(httpx.ConnectError):  # it took Mallory's answer and closed
            httpx.get(location)
        code, out, err = _finish(proc)
        token = (tmp_path / "creds" / "user.refresh_token").read_text().strip()
        assert _refresh_token_user(token) == "ANN0123@AdobeID", (
            f"stored {_refresh_token_user(token)}'s refresh token; another user found {found}"
        )
        assert found == "nothing"
        assert launched == bool(mode)
        assert (code, err) == (0, "")
        assert "the refresh token is for IMS user ANN0123@AdobeID\n" in out
    finally:
        (record / "keep").unlink()
        scanner.kill()
        scanner.wait()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _launched(record: Path, within: float) -> bool:
    """Whether the test launcher started within *within* seconds (it writes its pid)."""
    deadline = time.monotonic() + within
    while not (record / "pid").exists():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)  # another process's file: polled, under a deadline
    return True


# -- item 17 of issue 23: the loopback listener under a local attacker ----------------------


def _port_of(location: str) -> int:
    port = httpx.URL(location).port
    assert port is not None
    return port


def test_a_wrong_state_is_ignored_and_the_login_keeps_waiting(
    tmp_path: Path, user_fake: FakeIms
) -> None:
    _write_user(tmp_path / "creds", user_fake, "http://127.0.0.1:0/callback")
    proc = _login(tmp_path)
    location = _consent(_authorize_url(proc, user_fake))
    forged = re.sub(r"state=[^&]+", "state=forged", location)
    r = httpx.get(forged)
    assert r.status_code == 400
    assert "not for the login that is waiting" in r.text
    assert httpx.get(re.sub(r"state=[^&]+&?", "", location)).status_code == 400  # no state
    assert proc.poll() is None  # still waiting
    assert httpx.get(location).status_code == 200
    code, out, err = _finish(proc)
    assert (code, err) == (0, "")
    assert "ignored " in out
    assert _check_file(tmp_path / "creds" / "user.refresh_token")


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_localhost_is_served_on_both_loopback_addresses(tmp_path: Path, user_fake: FakeIms) -> None:
    if not _has_ipv6():
        pytest.skip("no IPv6 loopback (::1) on this machine")
    _write_user(tmp_path / "creds", user_fake, "http://localhost:0/callback")
    proc = _login(tmp_path)
    location = _consent(_authorize_url(proc, user_fake))
    port = _port_of(location)
    assert location.startswith(f"http://localhost:{port}/callback?")
    assert httpx.get(f"http://127.0.0.1:{port}/favicon.ico").status_code == 404
    # The browser's answer over ::1, the address it tries first.
    assert httpx.get(location.replace("localhost", "[::1]", 1)).status_code == 200
    code, _, err = _finish(proc)
    assert (code, err) == (0, "")


HOLD_IPV6 = """
import socket, sys
s = socket.socket(socket.AF_INET6)
s.bind(("::1", int(sys.argv[1])))
s.listen()
print("ready", flush=True)
sys.stdin.read()
"""


def test_another_user_holding_ipv6_localhost_refuses_the_login(
    tmp_path: Path,
    user_fake: FakeIms,
    make_user: Any,  # noqa: F811
) -> None:
    """Another local user listening on [::1]:PORT would get the browser's answer for
    ``localhost:PORT`` (browsers try ::1 first): the login refuses to start, in one line."""
    if not _has_ipv6():
        pytest.skip("no IPv6 loopback (::1) on this machine")
    assert SYSTEM_PYTHON is not None
    mallory = make_user()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    holder = _as_other(mallory, HOLD_IPV6, str(port))
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "ready\n", holder.stderr
        redirect = f"http://localhost:{port}/callback"
        _write_user(tmp_path / "creds", user_fake, redirect)
        code, out, err = _finish(_login(tmp_path, "--timeout", "5"))
        assert code == 1
        assert err == (
            f"imsd: login failed (user): cannot listen on [::1]:{port} (another process "
            f"holds it): Address already in use ({redirect})\n"
        )
        assert user_fake.url not in out  # no authorize URL was handed out
    finally:
        holder.kill()
        holder.wait()


BIND_IPV6 = """
import socket, sys
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
try:
    s.bind(("::1", int(sys.argv[1])))
    s.listen()
except OSError as e:
    print("refused", e.errno, flush=True)
else:
    print("bound", flush=True)
"""


def test_another_user_cannot_take_ipv6_localhost_during_the_login(
    tmp_path: Path,
    user_fake: FakeIms,
    make_user: Any,  # noqa: F811
) -> None:
    """The attack of issue 23 item 17: ``localhost:0`` got a free port on 127.0.0.1 only, and
    another local user bound [::1] on that port, where the browser's answer goes first."""
    if not _has_ipv6():
        pytest.skip("no IPv6 loopback (::1) on this machine")
    assert SYSTEM_PYTHON is not None
    mallory = make_user()
    _write_user(tmp_path / "creds", user_fake, "http://localhost:0/callback")
    proc = _login(tmp_path)
    try:
        location = _consent(_authorize_url(proc, user_fake))
        port = _port_of(location)
        squat = subprocess.run(
            [SYSTEM_PYTHON, "-I", "-c", BIND_IPV6, str(port)],
            user=mallory.uid,
            group=mallory.gid,
            capture_output=True,
            text=True,
            cwd="/",
            timeout=60,
        )
        assert squat.stdout == f"refused {errno.EADDRINUSE}\n", squat.stdout + squat.stderr
        assert httpx.get(location.replace("localhost", "[::1]", 1)).status_code == 200
        code, _, err = _finish(proc)
        assert (code, err) == (0, "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


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
