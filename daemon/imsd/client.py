"""A small client for applications: read a token from imsd's files or its socket.

Import-light on purpose (no daemon modules): an application can ``from imsd.client import
token`` without pulling in the daemon. Every function checks expiry, so a caller never
receives a token that is already dead (or about to be, within *min_validity* seconds).

    from imsd.client import headers
    httpx.get(url, headers=headers("aep", product="aep"))

Or as an ``auth=`` that follows rotation and recovers from a 401 (see :class:`HttpxAuth`;
``RequestsAuth`` when ``requests`` is installed, which this module never imports itself):

    httpx.Client(auth=HttpxAuth("aep", product="aep")).get(url)
"""

from __future__ import annotations

import functools
import json
import logging
import os
import stat
import time
import urllib.parse
from collections.abc import AsyncGenerator, Generator
from datetime import datetime
from pathlib import Path
from typing import Any, Final, TypeAlias

import httpx

__all__ = [
    "DEFAULT_OUTPUT_DIR",
    "DEFAULT_SOCKET",
    "HttpxAuth",
    "ImsdUnavailable",
    "headers",
    "request",
    "token",
    "token_document",
]

DEFAULT_OUTPUT_DIR: Final = Path(os.environ.get("IMSD_OUTPUT_DIR", "/run/imsd/tokens"))
#: A path as str or Path (a str is what config files and environments give).
StrPath: TypeAlias = "str | os.PathLike[str]"

DEFAULT_SOCKET: Final = Path(os.environ.get("IMSD_SOCKET", "/run/imsd/imsd.sock"))


class ImsdUnavailable(RuntimeError):
    """No usable token: the daemon is not running, access was refused, or the token is
    missing or expired. The message says which."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


def _expires_at(doc: dict[str, Any]) -> float:
    try:
        return datetime.fromisoformat(str(doc["expires_at"]).replace("Z", "+00:00")).timestamp()
    except (KeyError, ValueError) as e:
        raise ImsdUnavailable("token document has no valid expires_at") from e


def _check(doc: dict[str, Any], name: str, min_validity: float) -> dict[str, Any]:
    left = _expires_at(doc) - time.time()
    if left <= min_validity:
        raise ImsdUnavailable(
            f"{name}: token expires in {left:.0f}s (wanted > {min_validity}s)", code="expired"
        )
    return doc


def request(
    method: str, path: str, *, socket: StrPath | None = None, timeout: float = 10.0
) -> dict[str, Any]:
    """One request to the daemon's socket API; the JSON body, or ImsdUnavailable."""
    sock = Path(socket) if socket else DEFAULT_SOCKET
    transport = httpx.HTTPTransport(uds=str(sock))
    try:
        with httpx.Client(transport=transport, base_url="http://imsd", timeout=timeout) as c:
            resp = c.request(method, path)
    except (httpx.HTTPError, OSError) as e:
        raise _unreachable(sock, e) from e
    return _body(resp)


async def _arequest(
    method: str,
    path: str,
    *,
    socket: StrPath | None = None,
    timeout: float = 10.0,  # noqa: ASYNC109 (the HTTP client's)
) -> dict[str, Any]:
    """:func:`request` for async code (any event loop httpx supports)."""
    sock = Path(socket) if socket else DEFAULT_SOCKET
    transport = httpx.AsyncHTTPTransport(uds=str(sock))
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://imsd", timeout=timeout
        ) as c:
            resp = await c.request(method, path)
    except (httpx.HTTPError, OSError) as e:
        raise _unreachable(sock, e) from e
    return _body(resp)


def _unreachable(sock: Path, e: Exception) -> ImsdUnavailable:
    if _is_denied(e):  # before ConnectError: httpx wraps connect()'s EACCES in one
        return ImsdUnavailable(_denied(sock, "w"))
    if isinstance(e, httpx.ConnectError | FileNotFoundError):
        return ImsdUnavailable(f"imsd is not running (no socket at {sock})")
    return ImsdUnavailable(f"imsd socket {sock}: {type(e).__name__}")


def _is_denied(e: BaseException | None) -> bool:
    """Whether *e*, or what it was raised from (httpx → httpcore → OSError), is EACCES."""
    for _ in range(8):  # a chain, never a cycle; a few links suffice
        if e is None:
            return False
        if isinstance(e, PermissionError):
            return True
        e = e.__cause__ or e.__context__
    return False


# -- why access was denied ----------------------------------------------------------------

_BITS: Final = {"r": 0o4, "w": 0o2, "x": 0o1}


def _denial_text(
    path: Path,
    blocker: Path,
    st: os.stat_result,
    need: str,
    *,
    owner: str,
    group: str,
    member: str,
) -> str:
    """Why *path* cannot be used: *blocker* (*path* itself, or the directory above it that
    cannot be searched) lacks *need* ("r", "w"; "x" for a directory above) for this user, and
    which group, if any, grants it. *member*: whether this user is in that group: "no",
    "yes", or "later" (in the group database, but not in this login's groups)."""
    bit = _BITS[need if blocker == path else "x"]
    mode = stat.S_IMODE(st.st_mode)
    if blocker == path:
        where = f"permission denied: {path} is {owner}:{group} {mode:04o}"
    else:
        where = f"permission denied: {path}: {blocker} is {owner}:{group} {mode:04o}"
    if not mode & (bit << 3) or st.st_gid == 0:
        return f"{where}; only {owner} has access"
    if member == "yes":
        return where  # the group grants it, yet something else (an ACL, a MAC policy) denies
    if member == "later":
        return f"{where}; you joined group {group} after this login: log in again"
    return f'{where}; group {group} has access: sudo usermod -aG {group} "$USER", then log in again'


def _denied(path: Path, need: str) -> str:
    """:func:`_denial_text` for *path* (*need*: "r" to read it, "w" to connect to it): the
    nearest component this user can stat is the one that stops it."""
    import grp
    import pwd

    for blocker in (path, *path.parents):
        try:
            st = os.stat(blocker)
        except PermissionError:
            continue  # a directory above it cannot be searched
        except OSError:
            break
        try:
            owner = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            owner = str(st.st_uid)
        try:
            entry = grp.getgrgid(st.st_gid)
            group, members = entry.gr_name, entry.gr_mem
        except KeyError:
            group, members = str(st.st_gid), []
        try:
            me = pwd.getpwuid(os.geteuid())
            listed = me.pw_name in members or me.pw_gid == st.st_gid
        except KeyError:
            listed = False
        now = st.st_gid == os.getegid() or st.st_gid in os.getgroups()
        member = "yes" if now else "later" if listed else "no"
        return _denial_text(path, blocker, st, need, owner=owner, group=group, member=member)
    return f"permission denied: {path}"


def _body(resp: httpx.Response) -> dict[str, Any]:
    try:
        body: dict[str, Any] = resp.json()
    except ValueError as e:
        raise ImsdUnavailable(f"imsd answered HTTP {resp.status_code} without JSON") from e
    if not isinstance(body, dict):
        raise ImsdUnavailable(f"imsd answered HTTP {resp.status_code} without a JSON object")
    if resp.status_code >= 400:
        raise ImsdUnavailable(
            str(body.get("message") or body.get("error") or f"HTTP {resp.status_code}"),
            status=resp.status_code,
            code=body.get("error"),
        )
    return body


def token_document(
    name: str,
    *,
    output_dir: StrPath | None = None,
    socket: StrPath | None = None,
    min_validity: float = 60.0,
) -> dict[str, Any]:
    """The ``token.json`` document of *name*: from *socket* if given, else from the files."""
    if socket is not None:
        return _check(
            request("GET", f"/v1/credentials/{name}/token", socket=socket), name, min_validity
        )
    path = Path(output_dir or DEFAULT_OUTPUT_DIR) / name / "token.json"
    try:
        doc: dict[str, Any] = json.loads(path.read_bytes())
    except FileNotFoundError as e:
        raise ImsdUnavailable(f"{path} does not exist (is imsd running?)") from e
    except PermissionError as e:
        raise ImsdUnavailable(_denied(path, "r")) from e
    except ValueError as e:
        raise ImsdUnavailable(f"{path} is not valid JSON") from e
    if not isinstance(doc, dict):
        raise ImsdUnavailable(f"{path} is not a token document")
    return _check(doc, name, min_validity)


def _pick(doc: dict[str, Any], name: str, product: str | None) -> dict[str, str]:
    per_product: dict[str, dict[str, str]] = doc.get("headers") or {}
    if not per_product:
        raise ImsdUnavailable(f"{name}: token document has no headers")
    key = product or next(iter(per_product))
    if key not in per_product:
        raise ImsdUnavailable(f"{name} has no product {key!r} (it has: {', '.join(per_product)})")
    return dict(per_product[key])


def token(name: str, **kwargs: Any) -> str:
    """The access token of credential *name* (see :func:`token_document` for options)."""
    return str(token_document(name, **kwargs)["access_token"])


def headers(name: str, product: str | None = None, **kwargs: Any) -> dict[str, str]:
    """The request headers of *name* for *product* (default: the credential's first)."""
    return _pick(token_document(name, **kwargs), name, product)


# -- drop-in auth for HTTP clients ------------------------------------------------------------

_log = logging.getLogger("imsd.client")
#: Seconds a document read from the socket is used before asking again (a rotated token is
#: picked up within this; the old one stays valid meanwhile, and a 401 asks at once).
_SOCKET_RECHECK: Final = 60.0


class _Headers:
    """One credential's headers for one product, cached: from the files, re-read when
    ``token.json`` changes (one ``stat`` per request); from the socket, asked again after
    ``_SOCKET_RECHECK`` seconds or when the token is about to expire. A 401 forces one refresh
    through the socket."""

    def __init__(
        self,
        name: str,
        product: str | None,
        output_dir: StrPath | None,
        socket: StrPath | None,
        min_validity: float,
    ) -> None:
        self.name, self.product, self.min_validity = name, product, min_validity
        # The files unless only the socket is named; the socket for a forced refresh.
        self.from_socket = socket is not None and output_dir is None
        self.socket = Path(socket) if socket else DEFAULT_SOCKET
        self.path = Path(output_dir or DEFAULT_OUTPUT_DIR) / name / "token.json"
        # The document, the (inode, mtime ns, size) of the file it was read from, and when.
        self._cached: tuple[dict[str, Any] | None, tuple[int, int, int] | None, float] = (
            None,
            None,
            0.0,
        )

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None  # token_document says why
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _fresh(self) -> dict[str, Any] | None:
        """The cached document if it is still the current one and usable, else None."""
        doc, stamp, read_at = self._cached  # one tuple: threads may share this object
        if doc is None or _expires_at(doc) - time.time() <= self.min_validity:
            return None
        if self.from_socket:
            # A socket has no cheap "changed?": ask again now and then.
            return doc if time.monotonic() - read_at <= _SOCKET_RECHECK else None
        # The daemon replaces the file (atomically: a new inode) with every token.
        return doc if stamp is not None and self._stat() == stamp else None

    def _keep(self, doc: dict[str, Any], stamp: tuple[int, int, int] | None) -> dict[str, str]:
        picked = _pick(doc, self.name, self.product)  # refuse a document without them
        self._cached = (doc, stamp, time.monotonic())
        return picked

    def get(self) -> dict[str, str]:
        doc = self._fresh()
        if doc is not None:
            return _pick(doc, self.name, self.product)
        if self.from_socket:
            doc = token_document(self.name, socket=self.socket, min_validity=self.min_validity)
            return self._keep(doc, None)
        # Stat before reading: a replacement in between only makes the next request re-read.
        stamp = self._stat()
        doc = token_document(
            self.name, output_dir=self.path.parent.parent, min_validity=self.min_validity
        )
        return self._keep(doc, stamp)

    async def aget(self) -> dict[str, str]:
        doc = self._fresh()
        if doc is not None:
            return _pick(doc, self.name, self.product)
        if not self.from_socket:
            return self.get()  # one small read of a tmpfs file: not worth a thread
        path = f"/v1/credentials/{self.name}/token"
        doc = await _arequest("GET", path, socket=self.socket)
        return self._keep(_check(doc, self.name, self.min_validity), None)

    def _refreshed(self, doc: dict[str, Any]) -> dict[str, str]:
        # No stamp: the files may be newer still; the next request reads them again.
        return self._keep(_check(doc, self.name, 0), None)

    def refresh(self) -> dict[str, str]:
        """The headers after one forced refresh (the daemon may answer with the current
        token instead, within ``min_refresh_interval``)."""
        path = f"/v1/credentials/{self.name}/refresh"
        return self._refreshed(request("POST", path, socket=self.socket, timeout=60))

    async def arefresh(self) -> dict[str, str]:
        path = f"/v1/credentials/{self.name}/refresh"
        return self._refreshed(await _arequest("POST", path, socket=self.socket, timeout=60))


def _failed_refresh(name: str, e: ImsdUnavailable) -> None:
    # The caller gets the 401 as it came; this says why there was no second try.
    _log.warning("imsd: %s answered 401 and the forced refresh failed: %s", name, e)


class HttpxAuth(httpx.Auth):
    """``auth=`` for httpx (``Client`` and ``AsyncClient``): adds the headers of credential
    *name* for *product* (default: its first) from the files in *output_dir*, or from the
    daemon's socket when only *socket* is given, and re-reads them when the daemon writes a
    new token. On a 401 it asks the daemon at *socket* (default ``DEFAULT_SOCKET``) for one
    forced refresh and sends the request once more, unless the daemon had no newer token to
    give (then the 401 is returned). Raises :class:`ImsdUnavailable` when there is no
    usable token."""

    def __init__(
        self,
        name: str,
        product: str | None = None,
        *,
        output_dir: StrPath | None = None,
        socket: StrPath | None = None,
        min_validity: float = 60.0,
    ) -> None:
        self._h = _Headers(name, product, output_dir, socket, min_validity)

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        sent = self._h.get()
        request.headers.update(sent)
        response = yield request
        if response.status_code != 401:
            return
        try:
            again = self._h.get()  # the daemon may have rotated it meanwhile
            if again == sent:
                again = self._h.refresh()
        except ImsdUnavailable as e:
            _failed_refresh(self._h.name, e)
            return
        if again != sent:
            request.headers.update(again)
            yield request

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        sent = await self._h.aget()
        request.headers.update(sent)
        response = yield request
        if response.status_code != 401:
            return
        try:
            again = await self._h.aget()
            if again == sent:
                again = await self._h.arefresh()
        except ImsdUnavailable as e:
            _failed_refresh(self._h.name, e)
            return
        if again != sent:
            request.headers.update(again)
            yield request


def _origin(url: str) -> tuple[str, str, int]:
    """Scheme, host and port: where a token was attached for."""
    u = urllib.parse.urlsplit(url)
    scheme = u.scheme.lower()
    return scheme, (u.hostname or "").lower(), u.port or (443 if scheme == "https" else 80)


def _requests_auth() -> type:
    """``RequestsAuth``, built on first use so that importing this module never imports
    ``requests`` (which is not a dependency of imsd)."""
    import requests
    import requests.auth

    class RequestsAuth(requests.auth.AuthBase):
        """``auth=`` for requests: as :class:`HttpxAuth` (same arguments), retrying once
        after a 401 through the same connection adapter."""

        def __init__(
            self,
            name: str,
            product: str | None = None,
            *,
            output_dir: StrPath | None = None,
            socket: StrPath | None = None,
            min_validity: float = 60.0,
        ) -> None:
            self._h = _Headers(name, product, output_dir, socket, min_validity)

        def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
            sent = self._h.get()
            r.headers.update(sent)
            hook = functools.partial(self._on_response, origin=_origin(str(r.url)))
            r.register_hook("response", hook)  # type: ignore[no-untyped-call]
            return r

        def _on_response(
            self, resp: requests.Response, *, origin: tuple[str, str, int], **kwargs: Any
        ) -> requests.Response:
            # The hook stays on the request through redirects (requests copies it): a 401
            # from another origin is that host's, and retrying there would hand it the
            # token, which requests itself stripped. HttpxAuth's retry goes to the URL the
            # token was attached for (httpx runs the flow around the redirects).
            if resp.status_code != 401 or _origin(str(resp.request.url)) != origin:
                return resp
            failed = resp.request.headers.get("Authorization")
            try:
                again = self._h.get()
                if again.get("Authorization") == failed:
                    again = self._h.refresh()
            except ImsdUnavailable as e:
                _failed_refresh(self._h.name, e)
                return resp
            if again.get("Authorization") == failed:
                return resp
            # As requests' own HTTPDigestAuth: drain, resend through the adapter (which runs
            # no hooks, so this happens once), and keep the 401 in the history.
            resp.content  # noqa: B018
            resp.close()
            retry = resp.request.copy()
            retry.headers.update(again)
            new: requests.Response = resp.connection.send(retry, **kwargs)
            new.history.append(resp)
            new.request = retry
            return new

    return RequestsAuth


_lazy: dict[str, type] = {}


def __getattr__(attr: str) -> Any:
    if attr != "RequestsAuth":
        raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
    if attr not in _lazy:
        try:
            _lazy[attr] = _requests_auth()
        except ImportError as e:
            raise AttributeError("imsd.client.RequestsAuth needs requests installed") from e
    return _lazy[attr]
