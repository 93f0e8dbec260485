"""``imsd import``: a Developer Console download → native credential files.

:func:`plan_import` is pure: the download's JSON in, the files to write out (a TOML credential
per Console credential, its secret and any inline private key each in a separate 0600 file,
referenced by relative ``*_file`` fields). :func:`write_import` writes them atomically and
never replaces an existing file unless asked to. Every value is validated by parsing the
planned TOML back with the daemon's own credential parser before anything is written.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from imsd import console
from imsd.model import NAME_RE, CredentialError

if TYPE_CHECKING:
    from imsd.plugin import AuthMethod, Product

__all__ = [
    "DIRECTORY_MODE",
    "ImportFailed",
    "PlannedFile",
    "check_plan",
    "parse_options",
    "plan_import",
    "write_import",
]

SECRET_MODE: Final = 0o600
CREDENTIAL_MODE: Final = 0o640
_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")
DIRECTORY_MODE: Final = 0o750  # a credentials directory import creates: not world-readable
# Native field order in the written file (the rest keep their table order).
_ORDER: Final = ("auth", "client_id", "client_secret_file", "org_id", "scopes", "ims_url")


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


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ImportFailed(f"cannot write a {type(value).__name__} value")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def _render(
    table: Mapping[str, Any], header: str, options: Mapping[str, Mapping[str, str]] | None = None
) -> bytes:
    keys = [k for k in _ORDER if k in table] + [k for k in table if k not in _ORDER]
    lines = [f"# {header}"] + [f"{k} = {_toml_value(table[k])}" for k in keys]
    for product, values in (options or {}).items():
        lines.append(f"[product.{_toml_key(product)}]")
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in values.items()]
    return ("\n".join(lines) + "\n").encode()


def plan_import(
    download: bytes,
    *,
    source: str,
    name: str | None = None,
    product: str | Sequence[str] | None = None,
    secret_index: int = 0,
    private_key_file: str | None = None,
    options: Mapping[str, Mapping[str, str]] | None = None,
) -> list[PlannedFile]:
    """The files that import *download* (the bytes of a Console file named *source*):
    *product* (one or several) and each product's *options* go into every credential."""
    products = [product] if isinstance(product, str) else list(product or ())
    for named in options or {}:
        if named not in products:
            raise ImportFailed(
                f"option for a product not imported ({named}, --option): "
                f"add --product {named} or drop the option",
                usage=True,
            )
    try:
        obj = json.loads(download)
    except (ValueError, RecursionError) as e:
        raise ImportFailed(f"{source}: not JSON: {e}") from None
    if not isinstance(obj, dict) or console.detect(obj) is None:
        raise ImportFailed(f"{source}: not a Developer Console download (already native?)")
    stem = name or Path(source).stem
    if not NAME_RE.fullmatch(stem):
        raise ImportFailed(f"{stem!r}: names are 1-64 of A-Z a-z 0-9 . _ - (use --name)")
    try:
        tables = console.convert(obj, stem=stem, secret_index=secret_index)
    except console.ConsoleError as e:
        raise ImportFailed(f"{source}: {e.field}: {e}") from None
    out: list[PlannedFile] = []
    for cred_name, table in tables:
        table = dict(table)
        secret = table.pop("client_secret")
        out.append(PlannedFile(f"{cred_name}.secret", f"{secret}\n".encode(), SECRET_MODE, True))
        table["client_secret_file"] = f"{cred_name}.secret"
        if table.get("auth") == "jwt":
            inline = table.pop("private_key", None)
            if inline is not None:
                key = inline if inline.endswith("\n") else inline + "\n"
                out.append(PlannedFile(f"{cred_name}.key", key.encode(), SECRET_MODE, True))
                table["private_key_file"] = f"{cred_name}.key"
            elif private_key_file:
                table["private_key_file"] = private_key_file
            else:
                raise ImportFailed(
                    f"{cred_name}: a JWT credential needs its private key, which Console "
                    "downloads do not include: pass --private-key PATH (private.key from "
                    "config.zip). JWT reached end of life: prefer an OAuth Server-to-Server "
                    "credential"
                )
        if products:
            table["products"] = products
        header = f"imported from {Path(source).name} by imsd import; the secret is in a 0600 file"
        data = _render(table, header, options)
        out.append(PlannedFile(f"{cred_name}.toml", data, CREDENTIAL_MODE))
    return out


def check_plan(
    directory: Path,
    files: Sequence[PlannedFile],
    *,
    products: Mapping[str, Product] | None = None,
    auth_methods: Mapping[str, AuthMethod] | None = None,
) -> None:
    """Parse each planned credential with the daemon's parser, its planned secrets supplied
    in memory, and (given the plugins' *products*) check its products and their options as
    the daemon will: what import writes, the daemon will load."""
    from imsd.credentials import parse_credentials, read_secret_file
    from imsd.registry import validate_products

    planned = {directory / f.name: f.data for f in files}

    def read(path: Path) -> str:
        data = planned.get(path)
        return read_secret_file(path) if data is None else data.decode().rstrip("\r\n")

    for f in files:
        if f.name.endswith(".toml"):
            try:
                creds = parse_credentials(
                    directory / f.name,
                    f.data,
                    env={},
                    read_secret=read,
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
