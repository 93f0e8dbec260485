"""``imsd login NAME``: the first refresh token of an ``auth = "refresh_token"`` credential,
by the OAuth authorization-code flow with the user's consent in a browser.

Adobe's rules (developer.adobe.com/developer-console/docs/guides/authentication/
UserAuthentication/implementation and …/IMS, AdobeDocs/adobe-dev-console):

- only the **OAuth Web App** credential (confidential: it has a client secret) gets refresh
  tokens, and only when ``offline_access`` is requested and consented to; Single Page App
  and Native App credentials get none, so they cannot feed the daemon;
- the authorize request is ``GET /ims/authorize/v2?client_id&redirect_uri&scope&state&
  response_type=code``; ``code_challenge`` is "required for public clients" and optional
  otherwise, so a Web App may send one: we always do (S256), which binds the code to this
  process (RFC 9700 §2.1.1 recommends PKCE for confidential clients too);
- the code is exchanged at ``POST /ims/token/v3`` with ``grant_type=authorization_code``,
  the client authenticated by ``Authorization: Basic``;
- the ``redirect_uri`` must match the credential's Redirect URI pattern (else IMS falls back
  to its Default redirect URI) and IMS documents it as HTTPS. A plain ``http://127.0.0.1``,
  ``http://[::1]`` or ``http://localhost`` URI with a port gets a loopback listener; any other
  URI (``https://localhost/…`` included: we hold no certificate for it) is the paste route:
  the browser lands on a page that may not even load, and the user pastes its address here.

Other local users share the loopback interface, so the listener trusts nothing it is sent:

- an answer whose ``state`` is not this login's gets a 400 page and is ignored; the login
  keeps waiting until its deadline (one stray or hostile request cannot end it);
- ``localhost`` is bound on 127.0.0.1 *and* ::1 (browsers try ::1 first): if another process
  holds either, the login refuses to start rather than let it take the browser's answer;
- the authorize URL (``state``, ``code_challenge``) never goes on a command line, where
  ``/proc/PID/cmdline`` shows it to every local user: it is printed, and ``--browser`` hands
  it to the browser as a 0600 file; the PKCE verifier never leaves this process;
- ``state`` and PKCE bind the code to this login, not to the person: someone who learns the
  URL can consent with *their* account and deliver that code. So the account the refresh
  token belongs to (the ``id_token``'s or the answer's ``sub``, else the access token's
  ``user_id``) is printed before anything is stored, and ``--expect-user`` refuses any other.

The flow logic (URLs, state, PKCE, callback parsing, the token request) is pure; the I/O
(finding the credential, the listener, the HTTP call, the file) is kept thin at the bottom.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import hmac
import html
import http.server
import os
import secrets
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from imsd.model import (
    Credential,
    CredentialError,
    HttpRequest,
    HttpResponse,
    ImsError,
    Secret,
)

if TYPE_CHECKING:
    from imsd.config import Settings
    from imsd.plugin import AuthMethod, CredentialView, SecretSource
    from imsd.registry import Registry

__all__ = [
    "Identity",
    "LoginError",
    "LoginTarget",
    "authorize_url",
    "callback_code",
    "carries_state",
    "code_request",
    "identity_of",
    "loopback_address",
    "pkce_pair",
    "refresh_token_of",
    "run_login",
]

OFFLINE: Final = "offline_access"
AUTH_REFRESH_TOKEN: Final = "refresh_token"  # noqa: S105 (an auth method's name)
# What a loopback redirect's host name is served on: a browser tries each address
# ``localhost`` resolves to, ::1 first, so both must be ours.
_LOOPBACK_HOSTS: Final[Mapping[str, tuple[str, ...]]] = {
    "127.0.0.1": ("127.0.0.1",),
    "::1": ("::1",),
    "localhost": ("127.0.0.1", "::1"),
}
TOKEN_PATH: Final = "/ims/token/v3"  # noqa: S105
AUTHORIZE_PATH: Final = "/ims/authorize/v2"


class LoginError(Exception):
    """Why the login failed, one line, never a secret."""


@dataclass(frozen=True, slots=True)
class LoginTarget:
    """What the flow needs of a credential."""

    name: str
    client_id: str
    client_secret: Secret
    ims_url: str
    scopes: tuple[str, ...]  # offline_access included
    redirect_uri: str
    token_file: Path | None  # where refresh_token_file points; None: the state directory

    def __repr__(self) -> str:
        return f"LoginTarget({self.name!r})"


# -- pure flow logic ------------------------------------------------------------------------


def pkce_pair(verifier: str | None = None) -> tuple[str, str]:
    """(code_verifier, S256 code_challenge): 43 URL-safe characters, as RFC 7636 §4.1 asks."""
    verifier = verifier or secrets.token_urlsafe(32)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def with_offline(scopes: tuple[str, ...]) -> tuple[str, ...]:
    """*scopes* plus ``offline_access``: without it IMS returns no refresh token."""
    return scopes if OFFLINE in scopes else (*scopes, OFFLINE)


def authorize_url(target: LoginTarget, state: str, challenge: str) -> str:
    query = {
        "client_id": target.client_id,
        "redirect_uri": target.redirect_uri,
        "scope": ",".join(target.scopes),
        "state": state,
        "response_type": "code",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    return target.ims_url.rstrip("/") + AUTHORIZE_PATH + "?" + urlencode(query)


def loopback_address(redirect_uri: str) -> tuple[tuple[str, ...], int, str] | None:
    """(addresses to bind, port, path) when *redirect_uri* is served here: ``http`` to
    127.0.0.1, [::1] or localhost (both) with an explicit port (0: any free port, for a
    pattern that allows one); else None (the paste route)."""
    parts = urlsplit(redirect_uri)
    try:
        port = parts.port
    except ValueError:
        return None
    hosts = _LOOPBACK_HOSTS.get(parts.hostname or "")
    if parts.scheme != "http" or hosts is None or port is None:
        return None
    return hosts, port, parts.path or "/"


def with_port(redirect_uri: str, port: int) -> str:
    """*redirect_uri* with the port the listener actually got."""
    parts = urlsplit(redirect_uri)
    host = parts.hostname or ""
    return urlunsplit(
        parts._replace(netloc=f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    )


def _answer_params(text: str) -> dict[str, str]:
    text = text.strip()
    query = urlsplit(text).query if "://" in text else text.lstrip("?")
    return {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}


def carries_state(text: str, state: str) -> bool:
    """Whether a redirect (a URL, or its query string) is this login's answer: it carries
    *state*. Anything else is another login's answer or a forgery, to be ignored."""
    given = _answer_params(text).get("state", "")
    return hmac.compare_digest(given.encode(), state.encode())


def callback_code(text: str, state: str) -> str:
    """The code in a redirect (a URL, or its query string) that carries *state*; raises
    LoginError for an IMS error, a missing code or another state (another login's answer,
    or a forged one)."""
    params = _answer_params(text)
    if not params:
        raise LoginError("no code in what was pasted: paste the whole address the browser shows")
    if not carries_state(text, state):
        raise LoginError("the answer's state does not match this login's: start imsd login again")
    if "error" in params:
        described = params.get("error_description", "")
        more = f" ({_printable(described)})" if described else ""
        raise LoginError(f"IMS refused the login: {_printable(params['error'])}{more}")
    code = params.get("code", "")
    if not code:
        raise LoginError("the answer has no code")
    return code


def code_request(target: LoginTarget, code: str, verifier: str) -> HttpRequest:
    """The token request for *code*; a Web App credential authenticates with Basic."""
    basic = f"{target.client_id}:{target.client_secret.reveal()}".encode()
    return HttpRequest(
        "POST",
        target.ims_url.rstrip("/") + TOKEN_PATH,
        form={"grant_type": "authorization_code", "code": code, "code_verifier": verifier},
        headers={
            "Accept": "application/json",
            "Authorization": "Basic " + base64.b64encode(basic).decode(),
        },
    )


def refresh_token_of(resp: HttpResponse, now: float) -> Secret:
    """The refresh token of a code exchange's answer, or LoginError."""
    from imsd.flows import parse_token_response

    try:
        grant = parse_token_response(resp, now=now)
    except ImsError as e:
        detail = f" ({e})" if str(e) else ""
        raise LoginError(f"IMS refused the code: {e.code}{detail}") from None
    if grant.refresh_token is None:
        raise LoginError(
            "IMS returned no refresh token: the credential must be an OAuth Web App whose "
            f"APIs allow {OFFLINE}, and the user must consent to it"
        )
    return grant.refresh_token


@dataclass(frozen=True, slots=True)
class Identity:
    """Whose account a code exchange's tokens belong to, as IMS's answer says."""

    subject: str | None  # the IMS user id, ``…@AdobeID``
    email: str | None

    def __str__(self) -> str:
        if self.subject is None:
            return self.email or "an account IMS's answer does not name"
        return f"{self.subject} ({self.email})" if self.email else self.subject

    def matches(self, expected: str) -> bool:
        """Whether *expected* (a user id, or an email when IMS gave one) names this account."""
        want = expected.strip()
        if self.subject is not None and hmac.compare_digest(self.subject, want):
            return True
        return self.email is not None and self.email.casefold() == want.casefold()


def _claim(claims: Mapping[str, Any], key: str) -> str | None:
    value = claims.get(key)
    if isinstance(value, str) and 0 < len(value) <= 256 and value.isprintable():
        return value
    return None


def identity_of(resp: HttpResponse) -> Identity:
    """The account in a successful code exchange's answer: the ``id_token``'s ``sub`` (IMS
    returns one with ``openid``), else the answer's own ``sub``, else the access token's
    ``user_id`` claim; the email from the id_token when it has one. The id_token is read,
    not verified: it came straight from the token endpoint over the connection that
    authenticated IMS (OpenID Connect Core §3.1.3.7), as the refresh token itself did."""
    import json

    from imsd.flows import _claims

    try:
        body = json.loads(resp.body)
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        return Identity(None, None)
    id_token = _claims(body["id_token"]) if isinstance(body.get("id_token"), str) else {}
    access = _claims(body["access_token"]) if isinstance(body.get("access_token"), str) else {}
    subject = _claim(id_token, "sub") or _claim(body, "sub") or _claim(access, "user_id")
    return Identity(subject, _claim(id_token, "email"))


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else " " for c in text)[:200]


# -- the credential -------------------------------------------------------------------------


class _Capture:
    """Stands in for the refresh_token auth method while ``imsd login`` reads the file: it
    keeps the fields instead of reading the refresh token, which does not exist yet."""

    name = AUTH_REFRESH_TOKEN

    def __init__(self, real: AuthMethod | None) -> None:
        self.fields = frozenset(getattr(real, "fields", ())) | {
            "refresh_token_file",
            "refresh_token_env",
            "redirect_uri",
        }

    def validate(self, table: Mapping[str, Any], secrets: SecretSource) -> Mapping[str, Any]:
        return {k: table[k] for k in ("refresh_token_file", "redirect_uri") if table.get(k)}

    def flow(self, view: CredentialView, now: float, refresh_token: Secret | None) -> Any:
        raise NotImplementedError


def _token_file(cred: Credential, name: str) -> Path:
    """Where the daemon's parser will look for *name* (relative: next to the file)."""
    p = Path(name)
    if p.is_absolute():
        return p
    if os.path.normpath(name).split(os.sep)[0] == "..":
        raise LoginError(f"refresh_token_file may not leave the credentials directory ({name})")
    return cred.path.parent / p


def target_of(cred: Credential) -> LoginTarget:
    if cred.auth != AUTH_REFRESH_TOKEN:
        raise LoginError(
            f'{cred.path}: auth is {cred.auth!r}: imsd login is for auth = "refresh_token"'
        )
    redirect = cred.options.get("redirect_uri")
    if not isinstance(redirect, str):
        raise LoginError(
            f"{cred.path}: redirect_uri is not set: set it to the credential's Default "
            "redirect URI (Developer Console) or one its Redirect URI pattern matches"
        )
    file = cred.options.get("refresh_token_file")
    return LoginTarget(
        cred.name,
        cred.client_id,
        cred.client_secret,
        cred.ims_url,
        with_offline(cred.scopes),
        redirect,
        _token_file(cred, file) if isinstance(file, str) else None,
    )


def find_credential(settings: Settings, registry: Registry, name: str) -> LoginTarget:
    from imsd.credentials import parse_credentials, resolve_roots
    from imsd.watcher import scan_directory

    methods = {
        **registry.auth_methods,
        AUTH_REFRESH_TOKEN: _Capture(registry.auth_methods.get(AUTH_REFRESH_TOKEN)),
    }
    roots = resolve_roots(settings.secret_root_paths(os.environ))

    def parse(path: Path, data: bytes) -> list[Credential]:
        return parse_credentials(
            path, data, default_ims_url=settings.ims_url, secret_roots=roots, auth_methods=methods
        )

    scan = scan_directory(settings.credentials_dir, parse=parse)
    if scan is None:
        raise LoginError(f"cannot read credentials_dir ({settings.credentials_dir})")
    for path, result in sorted(scan.items()):
        if isinstance(result, CredentialError):
            if path.stem == name:
                raise LoginError(str(result))
            continue
        for cred in result:
            if cred.name == name:
                return target_of(cred)
    raise LoginError(
        f"no credential named {name} in {settings.credentials_dir}: imsd check lists problems"
    )


# -- I/O ------------------------------------------------------------------------------------


_ABSENT: Final = frozenset({errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT})  # no such address here
_REQUEST_TIMEOUT: Final = 10.0  # seconds a connection to the listener has to send its request
_ANSWERED: Final = "imsd: login answer received; you can close this tab.\n"
_NOT_OURS: Final = (
    "imsd: this answer is not for the login that is waiting (its state does not match) and "
    "was ignored. Open the address imsd login printed.\n"
)


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Unbound(Exception):
    def __init__(self, host: str, port: int, e: OSError) -> None:
        self.taken = e.errno == errno.EADDRINUSE
        held = " (another process holds it)" if self.taken else ""
        super().__init__(
            f"cannot listen on {_where(host, port)}{held}: {e.strerror or type(e).__name__}"
        )


class _Server(http.server.ThreadingHTTPServer):
    """One address of the listener; each connection gets its own thread, so one that never
    sends its request holds that thread (for :data:`_REQUEST_TIMEOUT`), not the login."""


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Listener:
    """The loopback listener: every address of the redirect's host on one port. It waits
    for the one request to *path* that *accept* says is this login's answer. Other paths (a
    browser's favicon) get 404 and answers *accept* refuses (another state) 400; neither
    ends the wait."""

    def __init__(
        self, hosts: tuple[str, ...], port: int, path: str, accept: Callable[[str], bool]
    ) -> None:
        self._path, self._accept = path, accept
        self._lock = threading.Lock()
        self._answer: str | None = None
        self._done = threading.Event()
        self.ignored = 0
        self._threads: list[tuple[_Server, threading.Thread]] = []
        self.servers = self._bind(hosts, port)

    @property
    def port(self) -> int:
        return int(self.servers[0].server_port)

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        listener = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = _REQUEST_TIMEOUT

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                if parts.path != listener._path:
                    self.send_error(404)
                    return
                status, text = listener._take(parts.query)
                body = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # the query holds the code
                pass

        return Handler

    def _take(self, query: str) -> tuple[int, str]:
        with self._lock:
            if self._answer is not None:
                return 404, "imsd: this login has its answer already.\n"
            if not self._accept(query):
                self.ignored += 1
                return 400, _NOT_OURS
            self._answer = query
        self._done.set()
        return 200, _ANSWERED

    def _bind(self, hosts: tuple[str, ...], port: int) -> list[_Server]:
        """A server on each of *hosts*, all on *port* (0: the first host's free port, tried
        again when another address has it taken). An address the machine does not have
        (no IPv6) is skipped unless it is the only one: nobody else can bind it either.
        Any other failure refuses the login: whoever holds an address gets the answer."""
        handler = self._handler()
        for attempt in range(8):
            servers: list[_Server] = []
            try:
                for host in hosts:
                    want = servers[0].server_port if servers else port
                    try:
                        servers.append(
                            (_Server6 if ":" in host else _Server)((host, want), handler)
                        )
                    except OSError as e:
                        if not (servers and e.errno in _ABSENT):
                            raise _Unbound(host, want, e) from None
                return servers
            except _Unbound as e:
                for s in servers:
                    s.server_close()
                if not (port == 0 and servers and e.taken and attempt < 7):
                    raise LoginError(str(e)) from None
                # else another process has this free port on the other address: another port
        raise AssertionError("unreachable")

    def wait(self, timeout: float, notice: Callable[[int], None]) -> str:
        """The query string of this login's answer; LoginError after *timeout* seconds.
        *notice* is told how many answers were ignored, whenever that grows."""
        import time

        for server in self.servers:
            thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True
            )
            thread.start()
            self._threads.append((server, thread))
        deadline = time.monotonic() + timeout
        told = 0
        while not self._done.wait(max(0.0, min(0.5, deadline - time.monotonic()))):
            with self._lock:
                ignored = self.ignored
            if ignored > told:
                told = ignored
                notice(ignored)
            if time.monotonic() >= deadline:
                raise LoginError(f"no answer from the browser within {timeout:g} s")
        with self._lock:
            assert self._answer is not None
            answer, ignored = self._answer, self.ignored
        if ignored > told:
            notice(ignored)
        return answer

    def close(self) -> None:
        for server, _ in self._threads:
            server.shutdown()
        for server in self.servers:
            server.server_close()
        self._threads.clear()


def _redirect_page(url: str) -> str:
    """A page that sends the browser to *url* (and links to it, should it not)."""
    quoted = html.escape(url, quote=True)
    return (
        "<!doctype html><meta charset=utf-8>"
        f'<meta http-equiv="refresh" content="0;url={quoted}">'
        f'<title>imsd login</title><p><a href="{quoted}">Continue to the Adobe login</a>\n'
    )


def _hand_to_browser(url: str) -> Path:
    """Open *url* in the user's browser without putting it on a command line (where
    ``/proc/PID/cmdline`` shows it to every local user): the launcher (Python's
    :mod:`webbrowser`, which passes its argument on argv) gets the path of a 0600 page, in
    a 0700 directory, that sends the browser on. Returns the directory, for the caller to
    remove when the login ends."""
    import tempfile
    import webbrowser

    folder = Path(tempfile.mkdtemp(prefix="imsd-login-"))  # 0700
    page = folder / "login.html"
    fd = os.open(page, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(_redirect_page(url))
    threading.Thread(target=webbrowser.open, args=(page.as_uri(),), daemon=True).start()
    return folder


def _post(req: HttpRequest, timeout: float) -> HttpResponse:
    import httpx

    try:
        r = httpx.post(req.url, data=dict(req.form), headers=dict(req.headers), timeout=timeout)
    except httpx.HTTPError as e:
        raise LoginError(
            f"cannot reach IMS ({urlsplit(req.url).netloc}): {type(e).__name__}"
        ) from None
    return HttpResponse(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content)


def save(target: LoginTarget, token: Secret, state_dir: Path) -> Path:
    """Write *token* 0600, atomically, where the credential reads it (else the state dir)."""
    from imsd.sinks import atomic_write, make_dirs

    path = target.token_file or state_dir / f"{target.name}.refresh_token"
    if target.token_file is None:
        make_dirs(state_dir, 0o700)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        atomic_write(fd, path.name, (token.reveal() + "\n").encode(), where=str(path.parent))
    finally:
        os.close(fd)
    return path


def run_login(
    target: LoginTarget,
    *,
    state_dir: Path,
    out: IO[str] = sys.stdout,
    paste: IO[str] = sys.stdin,
    browser: bool = False,
    expect_user: str | None = None,
    timeout: float = 300.0,
    now: Callable[[], float] | None = None,
) -> Path:
    """The whole login; returns where the refresh token was written."""
    import shutil
    import time

    state = secrets.token_urlsafe(24)
    verifier, challenge = pkce_pair()  # the verifier is only ever sent to the token endpoint
    loopback = loopback_address(target.redirect_uri)
    listener: _Listener | None = None
    if loopback is not None:
        hosts, port, callback = loopback
        try:
            listener = _Listener(hosts, port, callback, lambda query: carries_state(query, state))
        except LoginError as e:
            raise LoginError(f"{e} ({target.redirect_uri})") from None
        if port == 0:
            target = _replace_redirect(target, with_port(target.redirect_uri, listener.port))
    opened: Path | None = None
    try:
        url = authorize_url(target, state, challenge)
        print(
            f"Open this address in a browser and log in as the user whose tokens {target.name} "
            f"should carry:\n{url}",
            file=out,
            flush=True,
        )
        if browser:
            opened = _hand_to_browser(url)
        if listener is not None:
            print(f"waiting for the browser at {target.redirect_uri} ...", file=out, flush=True)

            def notice(ignored: int) -> None:
                print(
                    f"ignored {ignored} answer(s) that are not this login's (wrong state); "
                    "still waiting",
                    file=out,
                    flush=True,
                )

            answer = listener.wait(timeout, notice)
        else:
            print(
                "After you allow access, the browser goes to "
                f"{target.redirect_uri} (the page may not load): paste that whole address here:",
                file=out,
                flush=True,
            )
            answer = paste.readline()
            if not answer:
                raise LoginError("nothing was pasted (end of input)")
    finally:
        if listener is not None:
            listener.close()
        if opened is not None:
            shutil.rmtree(opened, ignore_errors=True)
    code = callback_code(answer, state)
    resp = _post(code_request(target, code, verifier), timeout=30.0)
    token = refresh_token_of(resp, (now or time.time)())
    who = identity_of(resp)
    if expect_user is not None and not who.matches(expect_user):
        raise LoginError(
            f"the account that consented is {_printable(str(who))}, not "
            f"{_printable(expect_user)} (--expect-user): nothing was stored; log in as that user"
        )
    print(f"the refresh token is for IMS user {_printable(str(who))}", file=out, flush=True)
    written = save(target, token, state_dir)
    print(f"wrote the refresh token to {written} (0600)", file=out)
    if target.token_file is None:
        print(f'set refresh_token_file = "{written}" in the credential file', file=out)
    return written


def _replace_redirect(target: LoginTarget, redirect_uri: str) -> LoginTarget:
    from dataclasses import replace

    return replace(target, redirect_uri=redirect_uri)


def main(
    settings: Settings,
    registry: Registry,
    name: str,
    *,
    browser: bool,
    timeout: float,
    expect_user: str | None = None,
) -> int:
    """``imsd login``: 0, or one line on stderr and exit 1 (2 for a credential problem)."""
    try:
        target = find_credential(settings, registry, name)
    except LoginError as e:
        print(f"imsd: {e}", file=sys.stderr)
        return 2
    try:
        run_login(
            target,
            state_dir=settings.state_dir,
            browser=browser,
            expect_user=expect_user,
            timeout=timeout,
        )
    except LoginError as e:
        print(f"imsd: login failed ({name}): {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"imsd: cannot write the refresh token ({name}): {e}", file=sys.stderr)
        return 1
    return 0
