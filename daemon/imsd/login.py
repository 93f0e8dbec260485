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
  to its Default redirect URI) and IMS documents it as HTTPS. A plain ``http://127.0.0.1``
  or ``http://localhost`` URI with a port gets a one-shot loopback listener; any other URI
  (``https://localhost/…`` included: we hold no certificate for it) is the paste route: the
  browser lands on a page that may not even load, and the user pastes its address here.

The flow logic (URLs, state, PKCE, callback parsing, the token request) is pure; the I/O
(finding the credential, the listener, the HTTP call, the file) is kept thin at the bottom.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import os
import secrets
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
    "LoginError",
    "LoginTarget",
    "authorize_url",
    "callback_code",
    "code_request",
    "loopback_address",
    "pkce_pair",
    "refresh_token_of",
    "run_login",
]

OFFLINE: Final = "offline_access"
AUTH_REFRESH_TOKEN: Final = "refresh_token"  # noqa: S105 (an auth method's name)
_LOOPBACK_HOSTS: Final = frozenset({"127.0.0.1", "localhost"})
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


def loopback_address(redirect_uri: str) -> tuple[str, int, str] | None:
    """(host to bind, port, path) when *redirect_uri* is served here: ``http`` to
    127.0.0.1 or localhost with an explicit port (0: any free port, for a pattern that
    allows one); else None (the paste route)."""
    parts = urlsplit(redirect_uri)
    try:
        port = parts.port
    except ValueError:
        return None
    if parts.scheme != "http" or parts.hostname not in _LOOPBACK_HOSTS or port is None:
        return None
    return "127.0.0.1", port, parts.path or "/"


def with_port(redirect_uri: str, port: int) -> str:
    """*redirect_uri* with the port the listener actually got."""
    parts = urlsplit(redirect_uri)
    return urlunsplit(parts._replace(netloc=f"{parts.hostname}:{port}"))


def callback_code(text: str, state: str) -> str:
    """The code in a redirect (a URL, or its query string) that carries *state*; raises
    LoginError for an IMS error, a missing code or another state (another login's answer,
    or a forged one)."""
    text = text.strip()
    query = urlsplit(text).query if "://" in text else text.lstrip("?")
    params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    if not params:
        raise LoginError("no code in what was pasted: paste the whole address the browser shows")
    if not hmac.compare_digest(params.get("state", "").encode(), state.encode()):
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


def _listen(
    host: str, port: int, path: str, *, timeout: float
) -> tuple[http.server.HTTPServer, Callable[[], str]]:
    """A server on (host, port) and a function that waits for the one request to *path*
    and returns its query string. Other paths (a browser's favicon) get 404."""
    got: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            if parts.path != path or got:
                self.send_error(404)
                return
            got.append(parts.query)
            body = b"imsd: login answer received; you can close this tab.\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # the query holds the code
            pass

    server = http.server.HTTPServer((host, port), Handler)
    server.timeout = 1.0

    def wait() -> str:
        import time

        deadline = time.monotonic() + timeout
        try:
            while not got:
                if time.monotonic() > deadline:
                    raise LoginError(f"no answer from the browser within {timeout:g} s")
                server.handle_request()
        finally:
            server.server_close()
        return got[0]

    return server, wait


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
    browser: bool = True,
    timeout: float = 300.0,
    now: Callable[[], float] | None = None,
) -> Path:
    """The whole login; returns where the refresh token was written."""
    import time

    state = secrets.token_urlsafe(24)
    verifier, challenge = pkce_pair()
    listener = loopback_address(target.redirect_uri)
    wait: Callable[[], str] | None = None
    if listener is not None:
        host, port, callback = listener
        try:
            server, wait = _listen(host, port, callback, timeout=timeout)
        except OSError as e:
            raise LoginError(
                f"cannot listen on {host}:{port} ({target.redirect_uri}): {e.strerror}"
            ) from None
        if port == 0:
            target = _replace_redirect(target, with_port(target.redirect_uri, server.server_port))
    url = authorize_url(target, state, challenge)
    print(f"Log in as the user whose tokens {target.name} should carry:\n{url}", file=out)
    if browser:
        import webbrowser

        threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()
    if wait is not None:
        print(f"waiting for the browser at {target.redirect_uri} ...", file=out, flush=True)
        answer = wait()
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
    code = callback_code(answer, state)
    resp = _post(code_request(target, code, verifier), timeout=30.0)
    token = refresh_token_of(resp, (now or time.time)())
    written = save(target, token, state_dir)
    print(f"wrote the refresh token to {written} (0600)", file=out)
    if target.token_file is None:
        print(f'set refresh_token_file = "{written}" in the credential file', file=out)
    return written


def _replace_redirect(target: LoginTarget, redirect_uri: str) -> LoginTarget:
    from dataclasses import replace

    return replace(target, redirect_uri=redirect_uri)


def main(
    settings: Settings, registry: Registry, name: str, *, browser: bool, timeout: float
) -> int:
    """``imsd login``: 0, or one line on stderr and exit 1 (2 for a credential problem)."""
    try:
        target = find_credential(settings, registry, name)
    except LoginError as e:
        print(f"imsd: {e}", file=sys.stderr)
        return 2
    try:
        run_login(target, state_dir=settings.state_dir, browser=browser, timeout=timeout)
    except LoginError as e:
        print(f"imsd: login failed ({name}): {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"imsd: cannot write the refresh token ({name}): {e}", file=sys.stderr)
        return 1
    return 0
