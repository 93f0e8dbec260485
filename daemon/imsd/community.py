"""Config files of the community Python clients (pure: JSON object in, native table out).

aepp (adobe/aepp), cjapy and aanalytics2 (pitchmuc) keep a credential in a small JSON file
that their ``createConfigFile`` writes and ``importConfigFile`` reads (reference/ims-protocol.md
§7; the libraries' ``configs.py``):

- OAuth Server-to-Server: ``org_id``, ``client_id`` (or ``api_key``), ``secret`` (aepp also
  ``client_secret`` or ``client_secrets[]``; cjapy also ``CLIENT_SECRETS[]``), ``scopes`` (a
  comma-separated string or a list);
- the JWT era: ``tech_id`` and ``pathToKey`` (a PEM file) instead of ``scopes``;
- aepp adds ``sandbox-name`` and ``environment`` (anything but ``prod`` is Adobe's stage IMS)
  and, for Adobe-internal services, ``auth_code``; aepp reads keys case-insensitively.

The three tools write the same keys, so a file says which tool it is for only through a key
one of them adds (aepp's ``sandbox-name``; a company id for Analytics; cjapy's upper-case
Console keys). ``imsd import`` converts these files (:func:`convert`); the daemon only
recognises them (:func:`detect`) to say so in one line (:func:`import_hint`), as their
fields do not carry what a native file needs (products, their options, metascopes).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

__all__ = [
    "PRODUCTS",
    "TOOLS",
    "Community",
    "CommunityError",
    "Converted",
    "convert",
    "detect",
    "import_hint",
]

AEPP: Final = "aepp"
CJAPY: Final = "cjapy"
AANALYTICS2: Final = "aanalytics2"
TOOLS: Final = (AEPP, CJAPY, AANALYTICS2)
#: The product each tool's API is, what its file is imported for by default.
PRODUCTS: Final = {AEPP: "aep", CJAPY: "cja", AANALYTICS2: "analytics"}
STAGE_IMS: Final = "https://ims-na1-stg1.adobelogin.com"  # aepp: any environment but prod

# Keys only these files have (lower-cased): with client_id or api_key, they make the shape.
_ONLY_COMMUNITY: Final = frozenset(
    {
        "secret",
        "client_secrets",
        "api_key",
        "sandbox-name",
        "environment",
        "tech_id",
        "pathtokey",
        "auth_code",
        "globalcompanyid",
        "company_id",
    }
)
# Keys only a native file has: such a file is native (with a typo, maybe), never a hint.
_NATIVE_ONLY: Final = frozenset(
    {
        "auth",
        "client_secret_file",
        "client_secret_env",
        "products",
        "product",
        "outputs",
        "ims_url",
        "extra_headers",
        "on_refresh",
        "metascopes",
        "private_key_file",
        "refresh_token_file",
        "refresh_token_env",
    }
)
# Keys (lower-cased) that say which tool's file it is; cjapy's are exact (upper-case).
_MARKERS: Final = {
    AEPP: frozenset({"sandbox-name", "environment", "auth_code"}),
    AANALYTICS2: frozenset({"globalcompanyid", "company_id"}),
}
_CJAPY_KEYS: Final = ("CLIENT_SECRETS", "SCOPES", "ORG_ID")
_PLACEHOLDER: Final = re.compile(r"<[^<>]*>")  # createConfigFile's "<orgID>", "<YourSecret>"
_SLUG: Final = re.compile(r"[^A-Za-z0-9._-]+")


class CommunityError(ValueError):
    """A community config file that cannot be imported; ``field`` names its key. The message
    never quotes a value."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class Community:
    """What a file is: the tools it can be from (one when a key says which)."""

    tools: tuple[str, ...]

    @property
    def label(self) -> str:
        """``an aepp config file``, ``an aepp, cjapy or aanalytics2 config file``..."""
        *rest, last = self.tools
        names = f"{', '.join(rest)} or {last}" if rest else last
        article = "an" if names[0] in "aeiou" else "a"
        return f"{article} {names} config file"


@dataclass(frozen=True, slots=True)
class Converted:
    """A community file as a native table, with what its tool implies."""

    community: Community
    table: dict[str, Any]
    #: the product of the file's tool (empty when the file could be any tool's)
    products: list[str] = field(default_factory=list)
    #: per product, options the file carries (``sandbox-name``, a company id)
    options: dict[str, dict[str, str]] = field(default_factory=dict)


def _lower(obj: Mapping[str, Any]) -> dict[str, Any]:
    """Keys lower-cased, as aepp reads them (the first of two spellings wins)."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        out.setdefault(str(key).lower(), value)
    return out


def detect(obj: Mapping[str, Any]) -> Community | None:
    """Which tools' config file *obj* can be, or None (a native file or something else).
    Call it on what :func:`imsd.console.detect` did not recognise."""
    keys = {str(k).lower() for k in obj}
    if keys & _NATIVE_ONLY or not keys & {"client_id", "api_key"}:
        return None
    if not keys & _ONLY_COMMUNITY:
        return None  # client_id, client_secret, org_id, scopes: a valid native file too
    tools = tuple(t for t in (AEPP, AANALYTICS2) if keys & _MARKERS[t])
    if "client_secrets" in obj:  # aepp's list (cjapy's is upper-case)
        tools = tools or (AEPP,)
    if not tools and any(k in obj for k in _CJAPY_KEYS):
        tools = (CJAPY,)  # cjapy reads the Console's upper-case keys beside its own
    return Community(tools[:1] or TOOLS)


def import_hint(path: Path, community: Community) -> str:
    """The one line the daemon says about a community file at *path*."""
    name = _SLUG.sub("-", path.stem).strip("-.")[:64] or "NAME"
    command = f"imsd import {path} --name {name}"
    if len(community.tools) > 1:
        choices = " or ".join(f"--product {PRODUCTS[t]} ({t})" for t in community.tools)
        command += f" with {choices}"
    return f"looks like {community.label}: run {command}, then remove it (it holds the secret)"


def _text(lowered: Mapping[str, Any], *keys: str, required: bool = True) -> str | None:
    for key in keys:
        value = lowered.get(key)
        if value in (None, ""):
            continue
        if not isinstance(value, str):
            raise CommunityError(key, "must be a string")
        if _PLACEHOLDER.fullmatch(value.strip()):
            raise CommunityError(
                key, "is still createConfigFile's placeholder: fill in the Console's value"
            )
        return value.strip()
    if required:
        raise CommunityError(keys[0], "is missing")
    return None


def _secret(lowered: Mapping[str, Any], index: int) -> str:
    single = _text(lowered, "secret", "client_secret", required=False)
    if single is not None:
        return single
    secrets = lowered.get("client_secrets")
    if not isinstance(secrets, list) or not secrets:
        raise CommunityError("secret", "is missing (or client_secrets, a list)")
    if not 0 <= index < len(secrets):
        raise CommunityError(
            "client_secrets", f"has {len(secrets)} secret(s); index {index} does not exist"
        )
    return _text({"client_secrets": secrets[index]}, "client_secrets") or ""


def _scopes(value: Any) -> list[str]:
    if isinstance(value, str):
        if _PLACEHOLDER.fullmatch(value.strip()):
            raise CommunityError(
                "scopes", "is still createConfigFile's placeholder: fill in the Console's value"
            )
        value = value.split(",")
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise CommunityError("scopes", "must be a comma-separated string or a list of names")
    scopes = [s.replace(" ", "") for s in value if s.strip()]  # as the tools send them
    if not scopes:
        raise CommunityError("scopes", "is empty")
    return scopes


def convert(
    obj: Mapping[str, Any],
    *,
    community: Community,
    secret_index: int = 0,
    key_dir: Path | None = None,
) -> Converted:
    """*obj* as a native table: OAuth Server-to-Server with ``scopes``, JWT with ``tech_id``
    (its key from ``pathToKey``, relative to *key_dir*: the file's directory). A JWT table has
    no ``metascopes``: the files never held them (the tools hard-coded them)."""
    lowered = _lower(obj)
    table: dict[str, Any] = {
        "client_id": _text(lowered, "client_id", "api_key"),
        "client_secret": _secret(lowered, secret_index),
        "org_id": _text(lowered, "org_id"),
    }
    environment = _text(lowered, "environment", required=False)
    if environment is not None and environment.lower() != "prod":
        table["ims_url"] = STAGE_IMS
    if lowered.get("scopes") not in (None, "", []):
        table["auth"] = "oauth_server_to_server"
        table["scopes"] = _scopes(lowered["scopes"])
    elif lowered.get("tech_id") or lowered.get("technical_account_id"):
        table["auth"] = "jwt"
        table["technical_account_id"] = _text(lowered, "tech_id", "technical_account_id")
        key = _text(lowered, "pathtokey", required=False)
        inline = _text(lowered, "private_key", required=False)
        if key is not None:
            path = Path(key).expanduser()
            table["private_key_file"] = str(
                path if path.is_absolute() else (key_dir or Path()) / path
            )
        elif inline is not None:
            table["private_key"] = inline
    elif lowered.get("auth_code"):
        raise CommunityError(
            "auth_code",
            "aepp's oauthV1 (an authorization code) is for Adobe-internal services: imsd "
            "cannot refresh it; create an OAuth Server-to-Server credential",
        )
    else:
        raise CommunityError("scopes", "is missing (or tech_id and pathToKey for JWT)")
    tools = community.tools
    products = [PRODUCTS[tools[0]]] if len(tools) == 1 else []
    options: dict[str, dict[str, str]] = {}
    sandbox = _text(lowered, "sandbox-name", required=False)
    if sandbox is not None:
        options["aep"] = {"sandbox": sandbox}
    company = _text(lowered, "globalcompanyid", "company_id", required=False)
    if company is not None:
        options["analytics"] = {"company_id": company}
    return Converted(community, table, products, options)
