"""Credential files → validated :class:`~imsd.model.Credential` values.

Parsing is pure apart from reading secret files, which goes through an injected callable.
Native files are TOML or JSON with the fields of the contract; Developer Console downloads
(see :mod:`imsd.console`) are converted to the same native fields first, so one validator
checks everything. Every error is a :class:`~imsd.model.CredentialError` naming the file and
the field; pydantic runs with ``hide_input_in_errors`` so no value (least of all a secret)
is ever echoed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import stat
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from imsd import community, console
from imsd.actions import parse_action
from imsd.model import (
    AUTH_S2S,
    DEFAULT_IMS_URL,
    NAME_RE,
    OUTPUT_KINDS,
    Credential,
    CredentialError,
    Secret,
    check_ims_url,
)
from imsd.plugin import AuthMethod
from imsd.templates import (
    MAX_TEMPLATE_SIZE,
    OutputTemplate,
    TemplateError,
    check_destination,
    parse_mode,
    parse_template,
)

__all__ = [
    "DEFAULT_SECRET_ROOTS",
    "EXTENSIONS",
    "MAX_FILE_SIZE",
    "PSEUDO_FILESYSTEMS",
    "builtin_auth_methods",
    "decode",
    "inside_roots",
    "parse_credentials",
    "read_secret_file",
    "read_user_file",
    "resolve_roots",
]

EXTENSIONS: Final = (".toml", ".json")
MAX_FILE_SIZE: Final = 1 << 20
#: Where no secret file can be: their regular files are the kernel's views (the daemon's
#: own environment at /proc/self/environ holds every credential's client_secret_env value).
PSEUDO_FILESYSTEMS: Final = (Path("/proc"), Path("/sys"))
# The same as strings, for a prefix test on a realpath (Path.is_relative_to is 10 µs apiece).
_PSEUDO: Final = tuple((os.fspath(p), os.fspath(p) + os.sep) for p in PSEUDO_FILESYSTEMS)

#: Where secret files and template sources may be besides the credentials directory and
#: ``$CREDENTIALS_DIRECTORY`` (the daemon's ``secret_roots`` setting; Docker's secrets).
DEFAULT_SECRET_ROOTS: Final = (Path("/run/secrets"),)

ReadSecret = Callable[[Path], str]
Output = Literal["token", "json", "headers", "env"]
_OUTPUTS: Final[tuple[Output, ...]] = ("token", "json", "headers", "env")
assert _OUTPUTS == OUTPUT_KINDS


def _kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
    ):
        if test(mode):
            return kind
    return "a special file"


def resolve_roots(roots: Iterable[Path]) -> tuple[str, ...]:
    """*roots* as the absolute, symlink-free paths :func:`inside_roots` compares with (each
    once: a root given twice, or as a symlink to another, is one root)."""
    return tuple(dict.fromkeys(os.path.realpath(r) for r in roots))


def inside_roots(real: str, roots: Sequence[str]) -> bool:
    """Whether the resolved path *real* is one of *roots* (resolved paths, as from
    :func:`resolve_roots`) or below one (pure: ``/run/secrets-x`` is not below
    ``/run/secrets``)."""
    for root in roots:
        below = root if root.endswith(os.sep) else root + os.sep
        if real == root or real.startswith(below):
            return True
    return False


def _outside(real: str, roots: Sequence[str]) -> str:
    return (
        f"outside every secret root ({', '.join(roots) or 'none'}): move the file into one,"
        " or add its directory to secret_roots in the daemon's config"
    )


def read_user_file(
    path: Path, *, limit: int = MAX_FILE_SIZE, roots: Sequence[str] | None = None
) -> bytes:
    """The bytes of the regular file at *path*, at most *limit* of them; the one way a scan
    reads a file a credential names (and the credential files themselves).

    Symlinks are followed (Kubernetes Secret volumes are made of them). Anything but a regular
    file is refused, before opening (opening a device can have effects) and after (the path
    may have been swapped): a FIFO's open waits for a writer and a tty's read for a line,
    which would block the scan thread for good, and ``/dev/zero`` never ends. ``O_NONBLOCK``
    keeps even a swapped-in FIFO from blocking the open. Given *roots* (resolved), the file
    opened must be inside one, as the kernel names it (``/proc/self/fd``): a symlink or a
    directory swapped between the caller's check and the open is caught. Raises OSError, or
    ValueError with a reason that names no content."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise ValueError(f"not a regular file ({_kind(mode)})")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"not a regular file ({_kind(mode)})")
        if roots is not None:
            try:
                opened = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:  # no /proc: the caller's check on the resolved path stands
                opened = None
            if opened is not None and not inside_roots(opened, roots):
                raise ValueError(f"it resolves to {opened}, {_outside(opened, roots)}")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise ValueError(f"file is larger than {_size(limit)}")
    return b"".join(chunks)


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n and n % (1 << 20) == 0 else f"{n} bytes"


def read_secret_file(path: Path, *, roots: Sequence[str] | None = None) -> str:
    """A secret file's content without its trailing newline (``echo secret > file``)."""
    try:
        return read_user_file(path, roots=roots).decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ValueError("file is not UTF-8 text") from None  # its str() quotes a byte


def secret_digest(value: str) -> bytes:
    """What a credential remembers of a secret file's value (the watcher compares it)."""
    return hashlib.sha256(value.encode()).digest()


class _Native(BaseModel):
    """The fields common to every auth method; the method's own fields are extras, checked
    against its ``fields`` and validated by the method itself."""

    model_config = ConfigDict(extra="allow", hide_input_in_errors=True, strict=False)

    name: str | None = None
    auth: str = Field(default=AUTH_S2S, min_length=1, max_length=64)
    client_id: str = Field(min_length=1, max_length=256)
    client_secret: str | None = None
    client_secret_file: str | None = None
    client_secret_env: str | None = None
    org_id: str
    scopes: list[str] = Field(default_factory=list)
    ims_url: str | None = None
    products: list[str] = Field(default_factory=lambda: ["generic"], min_length=1)
    outputs: list[Output] = Field(default_factory=lambda: list(_OUTPUTS), min_length=1)
    product: dict[str, dict[str, Any]] = Field(default_factory=dict)
    extra_headers: dict[str, str] = Field(default_factory=dict)
    on_refresh: dict[str, Any] | None = None
    template: list[dict[str, Any]] = Field(default_factory=list, max_length=32)

    @field_validator("scopes", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @field_validator("scopes")
    @classmethod
    def _scope_names(cls, v: list[str]) -> list[str]:
        v = [s.strip() for s in v]
        # s.split() == [s]: no whitespace in s (str.split splits where str.isspace says)
        if any(not s or "," in s or s.split() != [s] for s in v):
            raise ValueError("scope names must be non-empty and contain no commas or spaces")
        return v

    @field_validator("org_id")
    @classmethod
    def _org(cls, v: str) -> str:
        if not v.endswith("@AdobeOrg") or len(v) <= len("@AdobeOrg"):
            raise ValueError("must be an IMS org id ending with @AdobeOrg")
        return v

    @field_validator("products")
    @classmethod
    def _products(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("lists a product twice")
        return v

    @field_validator("outputs")
    @classmethod
    def _outputs(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("lists an output twice")
        return v


# Pure, and most credentials name the same few IMS hosts (an IP address parse per file).
_check_ims_url: Final = functools.lru_cache(maxsize=64)(check_ims_url)


def _ims_url(url: str, path: Path) -> str:
    try:
        return _check_ims_url(url)
    except ValueError as e:
        raise CredentialError(path, str(e), field="ims_url") from None


def decode(path: Path, data: bytes) -> dict[str, Any]:
    """The document in a credential file's *data*, read as the daemon reads it (TOML or JSON
    by *path*'s suffix), before any validation; CredentialError if it cannot be read."""
    if len(data) > MAX_FILE_SIZE:
        raise CredentialError(path, "file is larger than 1 MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CredentialError(path, "file is not UTF-8 text") from None
    if path.suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise CredentialError(path, f"invalid TOML: {e}") from None
        except RecursionError:
            raise CredentialError(path, "invalid TOML: nested too deeply") from None
    if path.suffix == ".json":
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise CredentialError(path, f"invalid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise CredentialError(path, "the JSON top level must be an object")
        return obj
    raise CredentialError(path, f"unsupported file type {path.suffix!r} (use .toml or .json)")


def _msg(error: Any) -> str:
    from imsd.config import pydantic_message  # the config's wording

    return pydantic_message(error)


def _validation_error(path: Path, err: ValidationError) -> CredentialError:
    first = err.errors(include_input=False, include_url=False)
    loc = ".".join(str(p) for p in first[0]["loc"]) or None
    msgs = [f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {_msg(e)}" for e in first[1:]]
    message = _msg(first[0]) + ("" if not msgs else f" (also: {'; '.join(msgs)})")
    if first[0]["type"] == "extra_forbidden":
        message = "unknown field (a typo?)" + ("" if not msgs else f" (also: {'; '.join(msgs)})")
    return CredentialError(path, message, field=loc)


class _Resolver:
    """Reads the secrets a credential names, recording them for the digest."""

    def __init__(
        self,
        path: Path,
        env: Mapping[str, str],
        read: ReadSecret,
        credentials_directory: Path | None,
        roots: Sequence[str],
    ) -> None:
        self.path = path
        self.env = env
        self.read = read
        self.creds_dir = credentials_directory
        self.roots = roots
        self.seen: list[str] = []
        self.files: list[tuple[Path, bytes]] = []

    def _locate(self, name: str, field: str) -> Path:
        if os.path.isabs(name):
            where = Path(name)
        else:
            # A relative name stays in its directory: whoever writes a credential file also
            # picks the IMS host its secrets are sent to.
            if os.path.normpath(name).split(os.sep)[0] == "..":
                raise CredentialError(
                    self.path,
                    "a relative path may not leave the credentials directory (use an "
                    "absolute path for a file elsewhere)",
                    field=field,
                )
            if self.creds_dir is not None and (self.creds_dir / name).exists():
                where = self.creds_dir / name
            else:
                where = self.path.parent / name
        real = os.path.realpath(where)  # a symlink to /proc/self/environ too
        for pseudo, below in _PSEUDO:
            if real == pseudo or real.startswith(below):
                raise CredentialError(
                    self.path, f"{where} is in {pseudo}, not a file of secrets", field=field
                )
        # Whoever writes a credential file picks its ims_url: the places its secrets may be
        # read from are the daemon's to say (secret_roots), not the file's.
        if not inside_roots(real, self.roots):
            shown = str(where) if real == os.fspath(where) else f"{where} (resolved: {real})"
            raise CredentialError(
                self.path, f"{shown} is {_outside(real, self.roots)}", field=field
            )
        return where

    def file(self, name: str, field: str) -> str:
        where = self._locate(name, field)
        try:
            value = self.read(where)
        except FileNotFoundError:
            raise CredentialError(self.path, f"file not found: {where}", field=field) from None
        except PermissionError:
            raise CredentialError(self.path, f"permission denied: {where}", field=field) from None
        except (OSError, ValueError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise CredentialError(
                self.path, f"cannot read {where}: {reason}", field=field
            ) from None
        self.files.append((where, secret_digest(value)))
        return self._keep(value, field)

    def var(self, name: str, field: str) -> str:
        if name not in self.env:
            raise CredentialError(self.path, f"environment variable {name} is not set", field=field)
        return self._keep(self.env[name], field)

    def _keep(self, value: str, field: str) -> str:
        if not value.strip():
            raise CredentialError(self.path, "the secret is empty", field=field)
        self.seen.append(value)
        return value


def _client_secret(m: _Native, r: _Resolver) -> Secret:
    given = [
        f for f in ("client_secret", "client_secret_file", "client_secret_env") if getattr(m, f)
    ]
    if len(given) != 1:
        raise CredentialError(
            r.path,
            "exactly one of client_secret, client_secret_file, client_secret_env is required"
            + (f" (found {', '.join(given)})" if given else ""),
            field="client_secret",
        )
    if m.client_secret is not None:
        return Secret(r._keep(m.client_secret, "client_secret"))
    if m.client_secret_file is not None:
        return Secret(r.file(m.client_secret_file, "client_secret_file"))
    assert m.client_secret_env is not None
    return Secret(r.var(m.client_secret_env, "client_secret_env"))


class _Secrets:
    """The :class:`imsd.plugin.SecretSource` given to auth methods: a resolver that raises
    ValueError (the method's error names the field) and returns :class:`Secret`."""

    def __init__(self, resolver: _Resolver) -> None:
        self._r = resolver

    def _call(self, read: Callable[[str, str], str], name: str, field: str) -> Secret:
        try:
            return Secret(read(name, field))
        except CredentialError as e:
            raise ValueError(f"{field}: {e.reason}") from None

    def file(self, name: str, field: str) -> Secret:
        return self._call(self._r.file, name, field)

    def env(self, name: str, field: str) -> Secret:
        return self._call(self._r.var, name, field)

    def value(self, value: str, field: str) -> Secret:
        return self._call(lambda v, f: self._r._keep(v, f), value, field)


def _unknown_keys(path: Path, table: Mapping[str, Any], methods: Mapping[str, AuthMethod]) -> None:
    """A key no field and no auth method knows: ``client_secert_file`` must be named as a
    typo, not reported as a missing ``client_secret``."""
    fields = {*_Native.model_fields, *(f for a in methods.values() for f in a.fields)}
    stray = sorted(k for k in table if k not in fields)
    if stray:
        from imsd.config import unknown_key  # the config's wording

        why = ": ".join(unknown_key(stray[0], fields, "the README's credential file section"))
        raise CredentialError(path, why, field=stray[0])


def _auth_options(m: _Native, r: _Resolver, methods: Mapping[str, AuthMethod]) -> Mapping[str, Any]:
    method = methods.get(m.auth)
    if method is None:
        known = ", ".join(sorted(methods)) or "none loaded"
        raise CredentialError(
            r.path, f"unknown auth method {m.auth!r} (known: {known})", field="auth"
        )
    extras = dict(m.model_extra or {})
    stray = sorted(set(extras) - method.fields)
    if stray:  # another method's field (_unknown_keys refused the others)
        owner = [n for n, other in sorted(methods.items()) if stray[0] in other.fields]
        raise CredentialError(
            r.path, f"applies to auth = {owner[0]!r}, not {m.auth!r}", field=stray[0]
        )
    table = {**m.model_dump(exclude={"client_secret"}), **extras, "scopes": tuple(m.scopes)}
    try:
        return dict(method.validate(table, _Secrets(r)))
    except CredentialError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        message = str(e)
        field, sep, rest = message.partition(": ")
        if sep and (field in method.fields or field in table):
            raise CredentialError(r.path, rest, field=field) from None
        raise CredentialError(r.path, message, field="auth") from None


@functools.cache
def builtin_auth_methods() -> Mapping[str, AuthMethod]:
    """The auth methods of the installed plugins, for callers that pass none (tools, tests)."""
    from imsd.registry import load_registry

    return dict(load_registry().auth_methods)


#: The names of a credential's own files: an instance so named would read as one of them.
_RESERVED: Final = frozenset({"token", "token.json"})


def _instances(path: Path, m: _Native) -> tuple[tuple[str, str], ...]:
    """(name, product) per ``products`` entry: an entry is the product of its name unless its
    table gives ``type``; then it is an instance of that product, named by the entry (whether
    that product exists is checked against the plugins by validate_products)."""
    out: list[tuple[str, str]] = []
    for name in m.products:
        table = m.product.get(name, {})
        if "type" not in table:
            out.append((name, name))
            continue
        where = f"product.{name}"
        product = table["type"]
        if not isinstance(product, str) or not product:
            raise CredentialError(path, "type: must be a product name", field=where)
        if not NAME_RE.fullmatch(name) or name in _RESERVED:
            raise CredentialError(
                path,
                "an instance name must be 1-64 of A-Z a-z 0-9 . _ -, not only dots, and not "
                + " or ".join(sorted(_RESERVED)),
                field=where,
            )
        out.append((name, product))
    return tuple(out)


_TEMPLATE_KEYS: Final = frozenset({"source", "content", "destination", "mode"})


def _template(
    path: Path, i: int, table: Mapping[str, Any], r: _Resolver, taken: set[str], names: list[str]
) -> tuple[OutputTemplate, str]:
    """``template[i]`` checked, and its text (for the digest). Its source is read now, so
    that every template error is an error of the credential file."""
    field = f"template[{i}]"
    stray = sorted(set(table) - _TEMPLATE_KEYS)
    if stray:
        from imsd.config import unknown_key  # the config's wording

        why = ": ".join(unknown_key(stray[0], _TEMPLATE_KEYS, "the README's Templates section"))
        raise CredentialError(path, why, field=f"{field}.{stray[0]}")
    if ("source" in table) == ("content" in table):
        raise CredentialError(path, "give one of source (a file) and content", field=field)
    try:
        destination = check_destination(table.get("destination"), taken)
        mode = parse_mode(table.get("mode"))
    except TemplateError as e:
        raise CredentialError(path, str(e), field=field) from None
    if "content" in table:
        text, origin = table["content"], f"{path}: {field}.content"
        if not isinstance(text, str) or len(text.encode()) > MAX_TEMPLATE_SIZE:
            raise CredentialError(path, "content must be text of at most 64 KiB", field=field)
    else:
        source = table["source"]
        if not isinstance(source, str) or not source:
            raise CredentialError(path, "source must be a file name", field=f"{field}.source")
        where = r._locate(source, f"{field}.source")
        try:
            text = read_user_file(where, limit=MAX_TEMPLATE_SIZE, roots=r.roots).decode("utf-8")
        except (OSError, ValueError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            if isinstance(e, UnicodeDecodeError):
                reason = "not UTF-8 text"
            raise CredentialError(
                path, f"cannot read {where}: {reason}", field=f"{field}.source"
            ) from None
        # A re-scan notices an edited template as it notices an edited secret file.
        r.files.append((where, secret_digest(text.rstrip("\r\n"))))
        origin = str(where)
    try:
        tpl = parse_template(
            text, destination=destination, origin=origin, instances=names, mode=mode
        )
    except TemplateError as e:
        raise CredentialError(path, str(e), field=field) from None
    taken.add(destination)
    return tpl, text


def _templates(
    path: Path, m: _Native, r: _Resolver, instances: tuple[tuple[str, str], ...]
) -> tuple[tuple[OutputTemplate, ...], list[str]]:
    names = [name for name, _ in instances]
    taken: set[str] = set()
    out: list[OutputTemplate] = []
    texts: list[str] = []
    for i, table in enumerate(m.template):
        tpl, text = _template(path, i, table, r, taken, names)
        out.append(tpl)
        texts.append(text)
    return tuple(out), texts


def _build(
    path: Path,
    name: str,
    table: Mapping[str, Any],
    *,
    raw: bytes,
    default_ims_url: str,
    resolver: _Resolver,
    auth_methods: Mapping[str, AuthMethod],
) -> Credential:
    _unknown_keys(path, table, auth_methods)  # a typo first: it explains what follows
    try:
        m = _Native.model_validate(dict(table))
    except ValidationError as e:
        raise _validation_error(path, e) from None
    name = m.name or name
    if not NAME_RE.fullmatch(name):
        raise CredentialError(
            path, "must be 1-64 of A-Z a-z 0-9 . _ -, and not only dots", field="name"
        )
    for product in m.product:
        if product not in m.products:
            raise CredentialError(
                path, f"options for a product not in products: {product!r}", field="product"
            )
    instances = _instances(path, m)
    for header, value in m.extra_headers.items():
        if not header or any(c in header for c in ":\r\n\0 ") or any(c in value for c in "\r\n\0"):
            raise CredentialError(
                path, "header names and values must be single-line", field="extra_headers"
            )
    action = None
    if m.on_refresh is not None:
        try:
            action = parse_action(m.on_refresh, path.parent)
        except ValueError as e:
            field, _, rest = str(e).partition(": ")
            raise CredentialError(path, rest, field=field) from None
    secret = _client_secret(m, resolver)
    options = _auth_options(m, resolver, auth_methods)
    ims_url = _ims_url(m.ims_url or default_ims_url, path)
    templates, texts = _templates(path, m, resolver, instances)
    h = hashlib.sha256(raw)
    for part in (name, ims_url, *resolver.seen, *texts):
        h.update(b"\0" + part.encode())
    return Credential(
        name=name,
        path=path,
        auth=m.auth,
        client_id=m.client_id,
        client_secret=secret,
        org_id=m.org_id,
        scopes=tuple(m.scopes),
        ims_url=ims_url,
        products=tuple(dict.fromkeys(product for _, product in instances)),
        outputs=tuple(m.outputs),
        product_options={
            k: {o: v for o, v in table.items() if o != "type"} for k, table in m.product.items()
        },
        options=options,
        extra_headers=dict(m.extra_headers),
        on_refresh=action,
        templates=templates,
        digest=h.hexdigest(),
        sources=tuple(resolver.files),
        instances=instances if any(i != p for i, p in instances) else (),
    )


def parse_credentials(
    path: Path,
    data: bytes,
    *,
    default_ims_url: str = DEFAULT_IMS_URL,
    env: Mapping[str, str] | None = None,
    read_secret: ReadSecret | None = None,
    credentials_directory: Path | None = None,
    secret_roots: Sequence[str] | None = None,
    auth_methods: Mapping[str, AuthMethod] | None = None,
) -> list[Credential]:
    """Every credential in the file at *path* (one for native files, one or more for a
    Developer Console project). Raises CredentialError naming the file and the field.

    Secret files and template sources must resolve inside one of *secret_roots* (resolved
    paths, from :func:`resolve_roots`); None: the file's directory, *credentials_directory*
    and :data:`DEFAULT_SECRET_ROOTS`. *read_secret* None reads them with
    :func:`read_secret_file`, which checks the roots again on the opened file."""
    obj = decode(path, data)
    if secret_roots is None:
        dirs = [path.parent, *([credentials_directory] if credentials_directory else [])]
        secret_roots = resolve_roots([*dirs, *DEFAULT_SECRET_ROOTS])
    if read_secret is None:
        read_secret = functools.partial(read_secret_file, roots=secret_roots)
    resolver = _Resolver(
        path, os.environ if env is None else env, read_secret, credentials_directory, secret_roots
    )
    kind = console.detect(obj)
    if kind is None and path.suffix == ".json" and (found := community.detect(obj)):
        # Their keys would read as native fields gone wrong (client_secret missing...).
        raise CredentialError(path, community.import_hint(path, found))
    if kind is None:
        tables = [(path.stem, obj)]
    else:
        try:
            tables = console.convert(obj, stem=path.stem)
        except console.ConsoleError as e:
            raise CredentialError(path, str(e), field=e.field) from None
    out: list[Credential] = []
    for name, table in tables:
        resolver.seen.clear()
        resolver.files.clear()
        out.append(
            _build(
                path,
                name,
                table,
                raw=data,
                default_ims_url=default_ims_url,
                resolver=resolver,
                auth_methods=builtin_auth_methods() if auth_methods is None else auth_methods,
            )
        )
    return out
