"""Adobe Developer Console downloads, read as they are (pure: JSON object in, native
credential tables out).

Three shapes (reference/ims-protocol.md §5):

- the flat OAuth Server-to-Server "Download JSON" (``CLIENT_ID``, ``CLIENT_SECRETS`` — up to
  two active secrets —, ``ORG_ID``, ``SCOPES``, ``TECHNICAL_ACCOUNT_*``); the JWT credential's
  (``API_KEY``, ``CLIENT_SECRET``, ``TECHNICAL_ACCOUNT_ID``, no scopes, metascopes nor key)
  only through ``imsd import`` (:func:`flat_jwt`), which is given what it lacks;
- the project/workspace file (``project.org.ims_org_id``,
  ``project.workspace.details.credentials[]`` with an ``oauth_server_to_server`` or ``jwt``
  payload): one credential per entry, named ``STEM.CREDENTIAL`` when there are several; when
  a JWT and an S2S credential share a client id (a migration in progress) only S2S is kept;
- the AEM as a Cloud Service technical account (``integration.technicalAccount``,
  ``integration.imsEndpoint``, the one place a per-credential IMS host appears).

The output tables use the native credential fields, so one validator checks everything.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

__all__ = ["ConsoleError", "convert", "detect", "flat_jwt", "is_flat_jwt"]

_SLUG = re.compile(r"[^A-Za-z0-9._-]+")
FLAT: Final = "console-s2s"
PROJECT: Final = "console-project"
AEM: Final = "aem"


class ConsoleError(ValueError):
    """A Developer Console file that cannot be used; ``field`` names the JSON path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def detect(obj: Mapping[str, Any]) -> str | None:
    """Which Console shape *obj* is, or None for a native credential."""
    if "CLIENT_ID" in obj or "API_KEY" in obj:
        return FLAT
    if isinstance(obj.get("project"), Mapping):
        return PROJECT
    if isinstance(obj.get("integration"), Mapping):
        return AEM
    return None


def _get(obj: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in obj or obj[key] in (None, "", []):
        raise ConsoleError(path, "is missing")
    return obj[key]


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConsoleError(path, "must be a non-empty string")
    return value


def _scopes(value: Any, path: str) -> list[str]:
    if isinstance(value, str):
        value = [s.strip() for s in value.split(",")]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise ConsoleError(path, "must be a list of scope names")
    return list(value)


def _secret(secrets: Any, index: int, path: str) -> str:
    if isinstance(secrets, str):
        secrets = [secrets]
    if not isinstance(secrets, list) or not secrets:
        raise ConsoleError(path, "must be a non-empty list of secrets")
    if not 0 <= index < len(secrets):
        raise ConsoleError(path, f"has {len(secrets)} secret(s); index {index} does not exist")
    return _str(secrets[index], f"{path}[{index}]")


def _ims_host(value: str) -> str:
    value = value.strip().rstrip("/")
    return value if "://" in value else f"https://{value}"


def _flat(obj: Mapping[str, Any], stem: str, index: int) -> list[tuple[str, dict[str, Any]]]:
    client_id = _str(obj.get("CLIENT_ID") or obj.get("API_KEY"), "CLIENT_ID")
    org = _str(_get(obj, "ORG_ID", "ORG_ID"), "ORG_ID")
    if "CLIENT_SECRETS" in obj:
        secret = _secret(obj["CLIENT_SECRETS"], index, "CLIENT_SECRETS")
    else:
        secret = _str(_get(obj, "CLIENT_SECRET", "CLIENT_SECRETS"), "CLIENT_SECRET")
    if "SCOPES" not in obj:
        raise ConsoleError(
            "SCOPES",
            "is missing (a JWT credential download? run imsd import FILE --private-key "
            "private.key: JWT needs its key and metascopes, which the download lacks)",
        )
    table: dict[str, Any] = {
        "auth": "oauth_server_to_server",
        "client_id": client_id,
        "client_secret": secret,
        "org_id": org,
        "scopes": _scopes(obj["SCOPES"], "SCOPES"),
    }
    return [(stem, table)]


def is_flat_jwt(obj: Mapping[str, Any]) -> bool:
    """Whether *obj* is the flat "Download JSON" of a Service Account (JWT) credential."""
    return detect(obj) == FLAT and "SCOPES" not in obj and "TECHNICAL_ACCOUNT_ID" in obj


def flat_jwt(obj: Mapping[str, Any], stem: str) -> list[tuple[str, dict[str, Any]]]:
    """The JWT credential of a flat JWT download, without ``metascopes`` and a key (the
    download has neither: the importer adds them)."""
    if "CLIENT_SECRETS" in obj:
        secret = _secret(obj["CLIENT_SECRETS"], 0, "CLIENT_SECRETS")
    else:
        secret = _str(_get(obj, "CLIENT_SECRET", "CLIENT_SECRET"), "CLIENT_SECRET")
    table: dict[str, Any] = {
        "auth": "jwt",
        "client_id": _str(obj.get("CLIENT_ID") or obj.get("API_KEY"), "API_KEY"),
        "client_secret": secret,
        "org_id": _str(_get(obj, "ORG_ID", "ORG_ID"), "ORG_ID"),
        "technical_account_id": _str(obj["TECHNICAL_ACCOUNT_ID"], "TECHNICAL_ACCOUNT_ID"),
    }
    return [(stem, table)]


def _project(obj: Mapping[str, Any], stem: str, index: int) -> list[tuple[str, dict[str, Any]]]:
    project = obj["project"]
    org = _str((project.get("org") or {}).get("ims_org_id"), "project.org.ims_org_id")
    details = ((project.get("workspace") or {}).get("details")) or {}
    creds = details.get("credentials")
    path = "project.workspace.details.credentials"
    if not isinstance(creds, list) or not creds:
        raise ConsoleError(path, "has no credentials")
    s2s_ids = {
        (c.get("oauth_server_to_server") or {}).get("client_id")
        for c in creds
        if isinstance(c, Mapping) and isinstance(c.get("oauth_server_to_server"), Mapping)
    }
    tables: list[tuple[str, dict[str, Any]]] = []
    for i, c in enumerate(creds):
        where = f"{path}[{i}]"
        if not isinstance(c, Mapping):
            raise ConsoleError(where, "must be an object")
        label = _SLUG.sub("-", str(c.get("name") or c.get("id") or i)).strip("-.") or str(i)
        s2s, jwt = c.get("oauth_server_to_server"), c.get("jwt")
        if isinstance(s2s, Mapping):
            table = {
                "auth": "oauth_server_to_server",
                "client_id": _str(
                    s2s.get("client_id"), f"{where}.oauth_server_to_server.client_id"
                ),
                "client_secret": _secret(
                    s2s.get("client_secrets"),
                    index,
                    f"{where}.oauth_server_to_server.client_secrets",
                ),
                "org_id": org,
                "scopes": _scopes(s2s.get("scopes"), f"{where}.oauth_server_to_server.scopes"),
            }
        elif isinstance(jwt, Mapping):
            if jwt.get("client_id") in s2s_ids:
                continue  # migration in progress: the S2S twin wins
            table = {
                "auth": "jwt",
                "client_id": _str(jwt.get("client_id"), f"{where}.jwt.client_id"),
                "client_secret": _str(jwt.get("client_secret"), f"{where}.jwt.client_secret"),
                "org_id": org,
                "technical_account_id": _str(
                    jwt.get("technical_account_id"), f"{where}.jwt.technical_account_id"
                ),
                "metascopes": _scopes(jwt.get("meta_scopes"), f"{where}.jwt.meta_scopes"),
            }
        else:
            continue  # API-key-only and user-OAuth credentials mint no server tokens
        tables.append((label, table))
    if not tables:
        raise ConsoleError(path, "has no OAuth Server-to-Server or JWT credential")
    if len(tables) == 1:
        return [(stem, tables[0][1])]
    return [(f"{stem}.{label}"[:64], table) for label, table in tables]


def _aem(obj: Mapping[str, Any], stem: str) -> list[tuple[str, dict[str, Any]]]:
    integ = obj["integration"]
    account = integ.get("technicalAccount") or {}
    table: dict[str, Any] = {
        "client_id": _str(account.get("clientId"), "integration.technicalAccount.clientId"),
        "client_secret": _str(
            account.get("clientSecret"), "integration.technicalAccount.clientSecret"
        ),
        "org_id": _str(integ.get("org"), "integration.org"),
    }
    if integ.get("imsEndpoint"):
        table["ims_url"] = _ims_host(_str(integ["imsEndpoint"], "integration.imsEndpoint"))
    if integ.get("scopes"):
        table.update(
            auth="oauth_server_to_server", scopes=_scopes(integ["scopes"], "integration.scopes")
        )
    else:
        table.update(
            auth="jwt",
            technical_account_id=_str(integ.get("id"), "integration.id"),
            metascopes=_scopes(
                _get(integ, "metascopes", "integration.metascopes"), "integration.metascopes"
            ),
            private_key=_str(integ.get("privateKey"), "integration.privateKey"),
        )
    return [(stem, table)]


def convert(
    obj: Mapping[str, Any], *, stem: str, secret_index: int = 0
) -> list[tuple[str, dict[str, Any]]]:
    """(name, native table) for each usable credential in a Console download."""
    kind = detect(obj)
    if kind == FLAT:
        return _flat(obj, stem, secret_index)
    if kind == PROJECT:
        return _project(obj, stem, secret_index)
    if kind == AEM:
        return _aem(obj, stem)
    raise ConsoleError("(top level)", "is not a Developer Console download")
