"""``imsd import``: a Developer Console download → native credential files.

:func:`plan_import` is pure: the download's JSON in, the files to write out (a TOML credential
per Console credential, its secret and any inline private key each in a separate 0600 file,
referenced by relative ``*_file`` fields). :func:`write_import` writes them atomically and
never replaces an existing file unless asked to. Every value is validated by parsing the
planned TOML back with the daemon's own credential parser before anything is written.

OAuth user credentials of a project file (the ``oauth2`` payload, which ``imsd.console``
leaves out: the daemon cannot use them until a user has logged in) are imported as
``auth = "refresh_token"`` credentials with their ``redirect_uri`` and a
``refresh_token_file`` that ``imsd login NAME`` fills. Only Web App (and the deprecated Web)
credentials qualify: Adobe gives Single Page App and Native App credentials no refresh
tokens (UserAuthentication/implementation.md in AdobeDocs/adobe-dev-console).
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from imsd import community, console
from imsd.model import NAME_RE, CredentialError

if TYPE_CHECKING:
    from imsd.plugin import AuthMethod, Product

__all__ = [
    "DIRECTORY_MODE",
    "LOGIN_SCOPES",
    "METASCOPES",
    "ImportFailed",
    "PlannedFile",
    "check_plan",
    "parse_options",
    "plan_import",
    "write_import",
]

SECRET_MODE: Final = 0o600
CREDENTIAL_MODE: Final = 0o640
DIRECTORY_MODE: Final = 0o750  # a credentials directory import creates: not world-readable
# Native field order in the written file (the rest keep their table order).
_ORDER: Final = ("auth", "client_id", "client_secret_file", "org_id", "scopes", "ims_url")
_SLUG: Final = re.compile(r"[^A-Za-z0-9._-]+")  # as imsd.console names project entries
#: What an imported user credential asks for: the identity scopes (a project file lists
#: none for OAuth user credentials; add the ones the credential's Scopes tab shows).
LOGIN_SCOPES: Final = ("openid", "AdobeID", "offline_access")
_CONFIDENTIAL: Final = frozenset({"oauthwebapp", "oauthweb"})
_PUBLIC: Final = frozenset({"oauthsinglepageapp", "oauthnativeapp", "oauthios", "oauthandroid"})


class ImportFailed(ValueError):
    """The download cannot be imported; the message names the field, never a secret.
    *usage* marks a mistake in the command line (a product or option), exit status 2."""

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


def parse_options(specs: Sequence[str]) -> dict[str, dict[str, str]]:
    """``--option PRODUCT.KEY=VALUE`` arguments as ``{product: {key: value}}`` (values are
    strings, as the plugins' options are)."""
    out: dict[str, dict[str, str]] = {}
    for spec in specs:
        target, eq, value = spec.partition("=")
        product, dot, key = target.partition(".")
        if not (eq and dot and product and key):
            raise ImportFailed(
                f"not PRODUCT.KEY=VALUE ({spec!r}, --option): e.g. --option aep.sandbox=prod",
                usage=True,
            )
        if key in out.setdefault(product, {}):
            raise ImportFailed(
                f"option given twice ({product}.{key}, --option): give it once", usage=True
            )
        out[product][key] = value
    return out


@dataclass(frozen=True, slots=True)
class PlannedFile:
    name: str
    data: bytes
    mode: int
    secret: bool = False

    def __repr__(self) -> str:  # secret files' contents stay out of reprs
        return f"PlannedFile({self.name!r}, {len(self.data)} bytes, mode={self.mode:o})"


def _render(
    name: str,
    table: Mapping[str, Any],
    header: Sequence[str],
    options: Mapping[str, Mapping[str, str]] | None = None,
) -> bytes:
    """The credential file *name*: every key and value through :mod:`imsd.tomlfile`, which
    escapes them and refuses bytes the daemon would read otherwise."""
    from imsd import tomlfile

    keys = [k for k in _ORDER if k in table] + [k for k in table if k not in _ORDER]
    document: dict[str, Any] = {k: table[k] for k in keys}
    if options:
        document["product"] = {p: dict(values) for p, values in options.items()}
    try:
        return tomlfile.render(Path(name), document, comments=header)
    except tomlfile.UnfaithfulWrite as e:
        raise ImportFailed(str(e)) from None


def _check_name(name: str, where: str) -> None:
    """The credential-name rule (:data:`imsd.model.NAME_RE`), and no leading dot: the name is
    also the file's stem, and the daemon ignores dotfiles."""
    if not NAME_RE.fullmatch(name) or name.startswith("."):
        raise ImportFailed(
            f"{name!r} ({where}): a credential name is 1-64 of A-Z a-z 0-9 . _ -, not "
            "starting with a dot (use --name)"
        )


def _label(entry: Mapping[str, Any], index: int) -> str:
    raw = str(entry.get("name") or entry.get("id") or index)
    return _SLUG.sub("-", raw).strip("-.") or str(index)


def _redirect(payload: Mapping[str, Any]) -> str | None:
    """The Default redirect URI (the pattern, ``redirect_uri``, may be a regular expression:
    used only when it is a plain URL)."""
    default = payload.get("defaultRedirectUri") or payload.get("default_redirect_uri")
    if isinstance(default, str) and default:
        return default
    pattern = payload.get("redirect_uri")
    candidates = pattern if isinstance(pattern, list) else [pattern]
    for uri in candidates:
        if isinstance(uri, str) and "://" in uri and not re.search(r"[\\*()\[\]|]", uri):
            return uri.split(",")[0].strip()
    return None


def _user_tables(
    obj: Mapping[str, Any], stem_path: str
) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """(label, native table) for each OAuth Web App credential of a project file, and why
    each other user credential was left out."""
    project = obj.get("project") or {}
    org = (project.get("org") or {}).get("ims_org_id")
    creds = (((project.get("workspace") or {}).get("details")) or {}).get("credentials")
    tables: list[tuple[str, dict[str, Any]]] = []
    skipped: list[str] = []
    for i, c in enumerate(creds if isinstance(creds, list) else []):
        if not isinstance(c, Mapping) or not isinstance(c.get("oauth2"), Mapping):
            continue
        kind, payload, label = str(c.get("integration_type", "")), c["oauth2"], _label(c, i)
        where = f"{stem_path}: project.workspace.details.credentials[{i}].oauth2"
        if kind in _PUBLIC or (kind not in _CONFIDENTIAL and not payload.get("client_secret")):
            skipped.append(label)
            continue
        for key in ("client_id", "client_secret"):
            if not isinstance(payload.get(key), str) or not payload[key]:
                raise ImportFailed(f"{where}.{key}: must be a non-empty string")
        if not isinstance(org, str) or not org:
            raise ImportFailed(f"{stem_path}: project.org.ims_org_id: must be a non-empty string")
        table: dict[str, Any] = {
            "auth": "refresh_token",
            "client_id": payload["client_id"],
            "client_secret": payload["client_secret"],
            "org_id": org,
            "scopes": list(LOGIN_SCOPES),
        }
        redirect = _redirect(payload)
        if redirect is not None:
            table["redirect_uri"] = redirect
        tables.append((label, table))
    return tables, skipped


def _without_user_credentials(obj: dict[str, Any]) -> dict[str, Any] | None:
    """*obj* without its oauth2 entries; None when nothing else is left."""
    project = dict(obj["project"])
    workspace = dict(project.get("workspace") or {})
    details = dict(workspace.get("details") or {})
    creds = details.get("credentials")
    kept = [
        c
        for c in (creds if isinstance(creds, list) else [])
        if not (isinstance(c, Mapping) and isinstance(c.get("oauth2"), Mapping))
    ]
    if isinstance(creds, list) and len(kept) == len(creds):
        return obj
    if not kept:
        return None
    details["credentials"] = kept
    workspace["details"] = details
    project["workspace"] = workspace
    return {**obj, "project": project}


def _server_label(obj: Mapping[str, Any], table: Mapping[str, Any]) -> str:
    """The label imsd.console gives the one server credential it converted."""
    creds = obj["project"]["workspace"]["details"]["credentials"]
    payload = "oauth_server_to_server" if table.get("auth") != "jwt" else "jwt"
    for i, c in enumerate(creds):
        if isinstance(c, Mapping) and (c.get(payload) or {}).get("client_id") == table.get(
            "client_id"
        ):
            return _label(c, i)
    return "server"


def _convert(
    obj: dict[str, Any], stem: str, source: str, secret_index: int
) -> list[tuple[str, dict[str, Any]]]:
    """Console's server credentials plus this module's user credentials, named as
    imsd.console names them: the stem alone for one, ``STEM.LABEL`` for several."""
    users: list[tuple[str, dict[str, Any]]] = []
    skipped: list[str] = []
    server: dict[str, Any] | None = obj
    if console.detect(obj) == console.PROJECT:
        users, skipped = _user_tables(obj, source)
        server = _without_user_credentials(obj)
    tables: list[tuple[str, dict[str, Any]]] = []
    if server is not None:
        try:
            tables = console.convert(server, stem=stem, secret_index=secret_index)
        except console.ConsoleError as e:
            if not users:
                raise ImportFailed(f"{source}: {e.field}: {e}") from None
    if not tables and not users:
        kinds = ", ".join(skipped)
        raise ImportFailed(
            f"{source}: no importable credential: {kinds} are Single Page App or Native App "
            "credentials, which Adobe gives no refresh tokens; add an OAuth Web App credential"
        )
    if not users:
        return tables
    if not tables and len(users) == 1:
        return [(stem, users[0][1])]
    if len(tables) == 1 and tables[0][0] == stem:
        tables = [(f"{stem}.{_server_label(obj, tables[0][1])}"[:64], tables[0][1])]
    return tables + [(f"{stem}.{label}"[:64], table) for label, table in users]


def login_needed(files: Sequence[PlannedFile]) -> list[str]:
    """The imported credentials that need ``imsd login NAME`` before the daemon can use
    them."""
    return [
        f.name.removesuffix(".toml")
        for f in files
        if f.name.endswith(".toml")
        and tomllib.loads(f.data.decode()).get("auth") == "refresh_token"
    ]


#: The metascopes a JWT credential of a product had (reference/ims-protocol.md §2; cjapy 0.2
#: signed both of CJA's), for downloads that do not list them.
METASCOPES: Final = {
    "aep": ("ent_dataservices_sdk",),
    "ajo": ("ent_dataservices_sdk",),
    "cja": ("ent_dataservices_sdk", "ent_cja_sdk"),
    "analytics": ("ent_analytics_bulk_ingest_sdk",),
    "analytics-1.4": ("ent_analytics_bulk_ingest_sdk",),
    "campaign": ("ent_campaign_sdk",),
}


@dataclass(frozen=True, slots=True)
class _Source:
    """What a download converts to, and what it implies."""

    tables: list[tuple[str, dict[str, Any]]]
    origin: str  # the header's "imported from ... (origin)"
    products: list[str]  # the file's tool's, when it names none
    options: dict[str, dict[str, str]]


def _read(
    obj: dict[str, Any], *, stem: str, source: str, secret_index: int, given: Sequence[str]
) -> _Source:
    kind = console.detect(obj)
    if kind is None:
        found = community.detect(obj)
        if found is None:
            raise ImportFailed(
                f"{source}: not a Developer Console download nor an aepp, cjapy or "
                "aanalytics2 config file (already native?)"
            )
        try:
            converted = community.convert(
                obj,
                community=found,
                secret_index=secret_index,
                key_dir=Path(os.path.abspath(source)).parent,
            )
        except community.CommunityError as e:
            raise ImportFailed(f"{source}: {e.field}: {e} ({found.label})") from None
        if not given and not converted.products:
            choices = ", ".join(f"--product {community.PRODUCTS[t]} ({t})" for t in found.tools)
            raise ImportFailed(
                f"{found.label} names no product ({source}, --product): add one of {choices}, "
                "or --product generic",
                usage=True,
            )
        return _Source(
            [(stem, converted.table)], found.label, converted.products, converted.options
        )
    if console.is_flat_jwt(obj):
        return _Source(console.flat_jwt(obj, stem), "a JWT credential download", [], {})
    try:
        tables = _convert(obj, stem, source, secret_index)
    except console.ConsoleError as e:
        raise ImportFailed(f"{source}: {e.field}: {e}") from None
    return _Source(tables, "", [], {})


def _metascopes(name: str, given: Sequence[str], products: Sequence[str]) -> list[str]:
    if given:
        return list(given)
    known = [m for p in products for m in METASCOPES.get(p, ())]
    if not known:
        raise ImportFailed(
            f"{name}: a JWT credential needs its metascopes, which this file does not list "
            "(--metascope): pass --metascope NAME (the credential's APIs in the Console, e.g. "
            "ent_dataservices_sdk) or the --product they are for",
            usage=True,
        )
    return list(dict.fromkeys(known))


def plan_import(
    download: bytes,
    *,
    source: str,
    name: str | None = None,
    product: str | Sequence[str] | None = None,
    secret_index: int = 0,
    private_key_file: str | None = None,
    options: Mapping[str, Mapping[str, str]] | None = None,
    metascopes: Sequence[str] = (),
) -> list[PlannedFile]:
    """The files that import *download* (the bytes of a Console file, or of an aepp, cjapy or
    aanalytics2 config file, named *source*): *product* (one or several; a community file's
    tool's product when none) and each product's *options* go into every credential."""
    given = [product] if isinstance(product, str) else list(product or ())
    try:
        obj = json.loads(download)
    except (ValueError, RecursionError) as e:
        raise ImportFailed(f"{source}: not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ImportFailed(f"{source}: not a Developer Console download (already native?)")
    stem = name or Path(source).stem
    _check_name(stem, "--name" if name else "the file's name")
    read = _read(obj, stem=stem, source=source, secret_index=secret_index, given=given)
    names = [cred_name for cred_name, _ in read.tables]
    for cred_name in names:
        _check_name(cred_name, f"a credential of {Path(source).name}")
    if len(set(names)) != len(names):
        raise ImportFailed(
            f"{Path(source).name}: two credentials would be named alike "
            f"({', '.join(sorted(n for n in set(names) if names.count(n) > 1))}): "
            "use a shorter --name"
        )
    products = given or read.products
    for named in options or {}:
        if named not in products:
            raise ImportFailed(
                f"option for a product not imported ({named}, --option): "
                f"add --product {named} or drop the option",
                usage=True,
            )
    # The file's own options (aepp's sandbox-name, a company id) for the products imported;
    # --option wins over them.
    merged: dict[str, dict[str, str]] = {
        p: dict(values) for p, values in read.options.items() if p in products
    }
    for p, values in (options or {}).items():
        merged.setdefault(p, {}).update(values)
    out: list[PlannedFile] = []
    for cred_name, table in read.tables:
        table = dict(table)
        secret = table.pop("client_secret")
        out.append(PlannedFile(f"{cred_name}.secret", f"{secret}\n".encode(), SECRET_MODE, True))
        table["client_secret_file"] = f"{cred_name}.secret"
        if table.get("auth") == "jwt":
            inline = table.pop("private_key", None)
            if private_key_file:  # the command line wins over a pathToKey
                table["private_key_file"] = private_key_file
            elif inline is not None:
                key = inline if inline.endswith("\n") else inline + "\n"
                out.append(PlannedFile(f"{cred_name}.key", key.encode(), SECRET_MODE, True))
                table["private_key_file"] = f"{cred_name}.key"
            elif "private_key_file" not in table:
                raise ImportFailed(
                    f"{cred_name}: a JWT credential needs its private key, which Console "
                    "downloads do not include: pass --private-key PATH (private.key from "
                    "config.zip). JWT reached end of life: prefer an OAuth Server-to-Server "
                    "credential"
                )
            if metascopes or "metascopes" not in table:
                table["metascopes"] = _metascopes(cred_name, metascopes, products)
        if table.get("auth") == "refresh_token":
            table["refresh_token_file"] = f"{cred_name}.refresh_token"
        if products:
            table["products"] = products
        origin = f" ({read.origin})" if read.origin else ""
        header = [
            f"imported from {Path(source).name}{origin} by imsd import; the secret is in a "
            "0600 file"
        ]
        if table.get("auth") == "refresh_token":
            header += [
                f"an OAuth Web App credential: run imsd login {cred_name} for its first "
                "refresh token;",
                "set redirect_uri to its Default redirect URI (or one its pattern matches) "
                "and add the scopes its Scopes tab lists",
            ]
        data = _render(f"{cred_name}.toml", table, header, merged)
        out.append(PlannedFile(f"{cred_name}.toml", data, CREDENTIAL_MODE))
    return out


def check_plan(
    directory: Path,
    files: Sequence[PlannedFile],
    *,
    products: Mapping[str, Product] | None = None,
    auth_methods: Mapping[str, AuthMethod] | None = None,
    secret_roots: Sequence[Path] | None = None,
) -> list[str]:
    """Parse each planned credential with the daemon's parser, its planned secrets supplied
    in memory, and (given the plugins' *products*) check its products and their options as
    the daemon will: what import writes, the daemon will load. *secret_roots*: the daemon's
    (:meth:`imsd.config.Settings.secret_root_paths`), beside *directory*; None: the
    defaults. Returns the products' scope hints (:func:`imsd.registry.scope_hints`)."""
    from imsd.credentials import (
        DEFAULT_SECRET_ROOTS,
        parse_credentials,
        read_secret_file,
        resolve_roots,
    )
    from imsd.registry import scope_hints, validate_products

    roots = resolve_roots(
        [directory, *(DEFAULT_SECRET_ROOTS if secret_roots is None else secret_roots)]
    )

    hints: list[str] = []

    planned = {directory / f.name: f.data for f in files}
    # imsd login writes these later: stand-ins, so the rest of the file is checked now.
    pending = {directory / f"{name}.refresh_token" for name in login_needed(files)}

    def read(path: Path) -> str:
        data = planned.get(path)
        if data is None and path in pending and not path.exists():
            return "pending-login"
        if data is None:
            return read_secret_file(path, roots=roots)
        return data.decode().rstrip("\r\n")

    for f in files:
        if f.name.endswith(".toml"):
            try:
                creds = parse_credentials(
                    directory / f.name,
                    f.data,
                    env={},
                    read_secret=read,
                    secret_roots=roots,
                    auth_methods=auth_methods,
                )
            except CredentialError as e:
                raise ImportFailed(str(e)) from None
            for cred in creds:
                if products is None:
                    continue
                try:
                    validate_products(cred, products)
                except CredentialError as e:
                    problem = _product_problem(e, cred.products, products)
                    raise ImportFailed(problem, usage=True) from None
                hints += scope_hints(cred, products)
    return hints


def _product_problem(
    e: CredentialError, named: Sequence[str], products: Mapping[str, Product]
) -> str:
    """A product error of a planned credential as the command line's mistake."""
    field = e.field or "products"
    if field == "products":
        unknown = ", ".join(n for n in named if n not in products)
        known = ", ".join(sorted(products)) or "none loaded"
        return f"unknown product ({unknown}, --product): choose among {known} (imsd plugins)"
    product = field.removeprefix("product.")
    return (
        f"{e.reason} ({product}, --option): "
        f"set it with --option {product}.KEY=VALUE (the README lists each product's options)"
    )


def write_import(directory: Path, files: Sequence[PlannedFile], *, force: bool = False) -> bool:
    """Write *files* into *directory*: secrets first (a credential never names a missing
    secret), each atomically; an existing file is an error unless *force*. A missing
    *directory* is created :data:`DIRECTORY_MODE`; returns whether it was."""
    from imsd.sinks import atomic_write

    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True, mode=DIRECTORY_MODE)
    if not force:
        taken = [f.name for f in files if (directory / f.name).exists()]
        if taken:
            raise ImportFailed(
                f"{directory}: {', '.join(taken)} already exist(s); use --force to replace"
            )
    ordered = sorted(files, key=lambda f: not f.secret)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for f in ordered:
            atomic_write(fd, f.name, f.data, mode=f.mode, where=str(directory))
    finally:
        os.close(fd)
    return created
