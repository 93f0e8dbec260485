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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from imsd import console
from imsd.model import NAME_RE

__all__ = ["ImportFailed", "PlannedFile", "check_plan", "plan_import", "write_import"]

SECRET_MODE: Final = 0o600
CREDENTIAL_MODE: Final = 0o640
# Native field order in the written file (the rest keep their table order).
_ORDER: Final = ("auth", "client_id", "client_secret_file", "org_id", "scopes", "ims_url")


class ImportFailed(ValueError):
    """The download cannot be imported; the message names the field, never a secret."""


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


def _render(table: Mapping[str, Any], header: str) -> bytes:
    keys = [k for k in _ORDER if k in table] + [k for k in table if k not in _ORDER]
    lines = [f"# {header}"] + [f"{k} = {_toml_value(table[k])}" for k in keys]
    return ("\n".join(lines) + "\n").encode()


def plan_import(
    download: bytes,
    *,
    source: str,
    name: str | None = None,
    product: str | None = None,
    secret_index: int = 0,
    private_key_file: str | None = None,
) -> list[PlannedFile]:
    """The files that import *download* (the bytes of a Console file named *source*)."""
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
        if product:
            table["products"] = [product]
        header = f"imported from {Path(source).name} by imsd import; the secret is in a 0600 file"
        out.append(PlannedFile(f"{cred_name}.toml", _render(table, header), CREDENTIAL_MODE))
    return out


def check_plan(directory: Path, files: Sequence[PlannedFile]) -> None:
    """Parse each planned credential with the daemon's parser, its planned secrets supplied
    in memory: what import writes, the daemon will load."""
    from imsd.credentials import parse_credentials, read_secret_file
    from imsd.model import CredentialError

    planned = {directory / f.name: f.data for f in files}

    def read(path: Path) -> str:
        data = planned.get(path)
        return read_secret_file(path) if data is None else data.decode().rstrip("\r\n")

    for f in files:
        if f.name.endswith(".toml"):
            try:
                parse_credentials(directory / f.name, f.data, env={}, read_secret=read)
            except CredentialError as e:
                raise ImportFailed(str(e)) from None


def write_import(directory: Path, files: Sequence[PlannedFile], *, force: bool = False) -> None:
    """Write *files* into *directory*: secrets first (a credential never names a missing
    secret), each atomically; an existing file is an error unless *force*."""
    from imsd.sinks import atomic_write

    directory.mkdir(parents=True, exist_ok=True)
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
