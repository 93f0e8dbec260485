"""The built-in auth methods: OAuth Server-to-Server, legacy JWT and OAuth refresh tokens.

Registered through the ``imsd`` entry points and built only on :mod:`imsd.plugin`, as a
third party's auth method would be. Each flow is a generator over request/response values
(reference/ims-protocol.md §1–§3); the daemon sends the requests.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from imsd.plugin import (
    AuthMethod,
    CredentialView,
    Flow,
    HttpRequest,
    ImsError,
    ImsErrorKind,
    Secret,
    SecretSource,
    expires_in_unit,
    hookimpl,
    parse_token_response,
)

from .jwt_assertion import DEPRECATION, PrivateKeyError, assertion_claims, load_key, sign

__all__ = ["Jwt", "RefreshToken", "ServerToServer", "client_credentials_flow"]

_ACCEPT: Final = {"Accept": "application/json"}
_JWT_HEADERS: Final = {"Accept": "application/json", "Cache-Control": "no-cache"}


def _post(
    cred: CredentialView, path: str, form: Mapping[str, str], headers: Mapping[str, str] = _ACCEPT
) -> HttpRequest:
    return HttpRequest("POST", cred.ims_url.rstrip("/") + path, form=dict(form), headers=headers)


def _names(value: Any, field: str) -> tuple[str, ...]:
    """A list of scope-like names, or a comma-separated string of them."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ValueError(f"{field}: must be a list of names")
    names = tuple(i.strip() for i in items if i.strip())
    if any(c.isspace() or c == "," for n in names for c in n):
        raise ValueError(f"{field}: names contain no commas or spaces")
    return names


def _text(table: Mapping[str, Any], field: str, *, required: bool = True) -> str | None:
    value = table.get(field)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        auth = table.get("auth")
        raise ValueError(f'{field}: required for auth = "{auth}" (a non-empty string)')
    return value.strip()


def _one_of(table: Mapping[str, Any], fields: Sequence[str]) -> str | None:
    given = [f for f in fields if table.get(f) is not None]
    if len(given) > 1:
        raise ValueError(f"{given[1]}: give only one of {', '.join(fields)}")
    return given[0] if given else None


# -- OAuth Server-to-Server ----------------------------------------------------------------


def client_credentials_flow(cred: CredentialView, now: float, *, version: str = "v3") -> Flow:
    """One POST of ``grant_type=client_credentials`` to ``/ims/token/{version}``."""
    path = f"/ims/token/{version}"
    form = {
        "grant_type": "client_credentials",
        "client_id": cred.client_id,
        "client_secret": cred.client_secret.reveal(),
        "scope": ",".join(cred.scopes),
    }
    response = yield _post(cred, path, form)
    return parse_token_response(response, now=now, unit=expires_in_unit(path))


class ServerToServer:
    name = "oauth_server_to_server"
    notice: str | None = None
    fields: frozenset[str] = frozenset()

    def validate(self, table: Mapping[str, Any], secrets: SecretSource) -> Mapping[str, Any]:
        if not table.get("scopes"):
            raise ValueError("scopes: at least one scope is required")
        return {}

    def flow(self, view: CredentialView, now: float, refresh_token: Secret | None) -> Flow:
        return client_credentials_flow(view, now)


# -- legacy JWT service account -------------------------------------------------------------


class Jwt:
    """Signs a fresh 5-minute RS256 assertion for every exchange (``/ims/exchange/jwt``,
    ``expires_in`` in milliseconds). Adobe retired these credentials; :attr:`notice` says how
    to migrate."""

    name = "jwt"
    notice: str | None = DEPRECATION
    fields: frozenset[str] = frozenset(
        {
            "technical_account_id",
            "metascopes",
            "private_key_file",
            "private_key",
            "private_key_passphrase_file",
            "private_key_passphrase_env",
        }
    )

    def validate(self, table: Mapping[str, Any], secrets: SecretSource) -> Mapping[str, Any]:
        account = _text(table, "technical_account_id")
        if "metascopes" not in table:
            raise ValueError(
                'metascopes: required for auth = "jwt" (e.g. ["ent_dataservices_sdk"])'
            )
        metascopes = _names(table["metascopes"], "metascopes")
        if not metascopes:
            raise ValueError("metascopes: at least one metascope is required")
        source = _one_of(table, ("private_key_file", "private_key"))
        if source is None:
            raise ValueError('private_key_file: required for auth = "jwt"')
        pem = (
            secrets.file(str(table["private_key_file"]), "private_key_file")
            if source == "private_key_file"
            else secrets.value(str(table["private_key"]), "private_key")
        )
        passphrase: Secret | None = None
        where = _one_of(table, ("private_key_passphrase_file", "private_key_passphrase_env"))
        if where == "private_key_passphrase_file":
            passphrase = secrets.file(str(table[where]), where)
        elif where == "private_key_passphrase_env":
            passphrase = secrets.env(str(table[where]), where)
        try:  # a key that cannot sign is a file error now, not a failed refresh later
            _loaded_key(pem, passphrase)
        except PrivateKeyError as e:
            raise ValueError(f"{source}: {e}") from None
        options: dict[str, Any] = {
            "technical_account_id": account,
            "metascopes": metascopes,
            "private_key": pem,
        }
        if passphrase is not None:
            options["passphrase"] = passphrase
        return options

    def flow(self, view: CredentialView, now: float, refresh_token: Secret | None) -> Flow:
        return jwt_flow(view, now)


#: Loaded keys by the digest of their PEM and passphrase. Parsing an encrypted key runs its
#: key derivation (deliberately slow): it is done once, by ``validate`` in the scan thread,
#: not on the event loop at every refresh. Bounded: old versions of edited keys fall out.
_KEYS: dict[bytes, RSAPrivateKey] = {}
_KEYS_MAX: Final = 1024


def _loaded_key(pem: Secret, passphrase: Secret | None) -> RSAPrivateKey:
    secret = passphrase.reveal().encode() if passphrase is not None else None
    digest = hashlib.sha256(
        pem.reveal().encode() + b"\0" + (secret if secret is not None else b"\1")
    ).digest()
    key = _KEYS.get(digest)
    if key is None:
        key = load_key(pem.reveal().encode(), secret)
        if len(_KEYS) >= _KEYS_MAX:
            _KEYS.pop(next(iter(_KEYS)), None)
        _KEYS[digest] = key
    return key


def jwt_flow(cred: CredentialView, now: float) -> Flow:
    opts = cred.options
    passphrase = opts.get("passphrase")
    try:
        key = _loaded_key(
            opts["private_key"], passphrase if isinstance(passphrase, Secret) else None
        )
    except PrivateKeyError as e:
        raise ImsError(ImsErrorKind.PERMANENT, "invalid_private_key", str(e)) from None
    claims = assertion_claims(
        client_id=cred.client_id,
        org_id=cred.org_id,
        technical_account_id=str(opts["technical_account_id"]),
        metascopes=tuple(opts["metascopes"]),
        ims_url=cred.ims_url,
        now=now,
    )
    path = "/ims/exchange/jwt"
    form = {
        "client_id": cred.client_id,
        "client_secret": cred.client_secret.reveal(),
        "jwt_token": sign(claims, key),
    }
    response = yield _post(cred, path, form, _JWT_HEADERS)
    return parse_token_response(response, now=now, unit=expires_in_unit(path))


# -- OAuth refresh tokens -------------------------------------------------------------------

_NEW_LOGIN: Final = (
    "the refresh token was refused (expired, revoked or already used): a new login is "
    "needed; put the new refresh token in refresh_token_file"
)


class RefreshToken:
    """``grant_type=refresh_token`` on ``/ims/token/v3``. IMS rotates the refresh token on
    every use; the daemon persists the returned one and passes it back as *refresh_token*."""

    name = "refresh_token"
    notice: str | None = None
    #: ``redirect_uri`` is only read by ``imsd login`` (which obtains the first token)
    fields: frozenset[str] = frozenset({"refresh_token_file", "refresh_token_env", "redirect_uri"})

    def validate(self, table: Mapping[str, Any], secrets: SecretSource) -> Mapping[str, Any]:
        if not isinstance(table.get("redirect_uri", ""), str):
            raise ValueError("redirect_uri: must be a URL string")
        where = _one_of(table, ("refresh_token_file", "refresh_token_env"))
        if where is None:
            raise ValueError('refresh_token_file: required for auth = "refresh_token"')
        read = secrets.file if where == "refresh_token_file" else secrets.env
        try:
            return {"refresh_token": read(str(table[where]), where)}
        except ValueError as e:
            if "file not found" not in str(e):
                raise
            raise ValueError(f"{e}; imsd login NAME obtains the first refresh token") from None

    def flow(self, view: CredentialView, now: float, refresh_token: Secret | None) -> Flow:
        return refresh_token_flow(view, now, refresh_token)


def refresh_token_flow(cred: CredentialView, now: float, refresh_token: Secret | None) -> Flow:
    current = refresh_token or cred.options.get("refresh_token")
    if not isinstance(current, Secret) or not current:
        raise ImsError(ImsErrorKind.PERMANENT, "invalid_grant", "no refresh token")
    path = "/ims/token/v3"
    form = {
        "grant_type": "refresh_token",
        "refresh_token": current.reveal(),
        "client_id": cred.client_id,
        "client_secret": cred.client_secret.reveal(),
    }
    response = yield _post(cred, path, form)
    try:
        return parse_token_response(response, now=now, unit=expires_in_unit(path))
    except ImsError as e:
        if e.code != "invalid_grant":
            raise
        raise ImsError(e.kind, e.code, _NEW_LOGIN, status=e.status) from None


@hookimpl
def imsd_auth_methods() -> list[AuthMethod]:
    return [ServerToServer(), Jwt(), RefreshToken()]
