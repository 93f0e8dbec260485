"""Rendering a credential's token into the bytes of its output files (pure).

Products produce header and env mappings through the plugin API; everything they return is
validated here, so no plugin can inject a header line, an env line or a stray newline into a
file that ``curl -H @file``, systemd's ``EnvironmentFile=`` or ``docker --env-file`` will read.
Error messages name the credential, the product and at most a header or variable name; never a
value, never the text of a plugin's exception (which may quote the token).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii
from typing import Any, Final

from imsd.model import MAX_TIMESTAMP, Credential, Grant, ValidatedOptions, https_or_loopback
from imsd.plugin import Product, TokenView
from imsd.templates import ModedBytes, TemplateError, render, variables

__all__ = [
    "BASE_URL_OPTION",
    "RenderError",
    "Unrendered",
    "Unresolved",
    "document",
    "document_safe",
    "instance_entry",
    "instances",
    "product_env",
    "product_headers",
    "product_urls",
    "render_outputs",
    "render_safe",
    "rfc3339",
    "token_view",
    "validated_options",
]

#: The instance option that overrides its product's base URL (README "Proxy").
BASE_URL_OPTION: Final = "base_url"

# RFC 7230 token characters. Always used with fullmatch: "$" would accept a trailing newline.
_HEADER_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_ENV_KEY: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Framing headers belong to the HTTP client; a file that sets them breaks every request.
_HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "content-length",
        "host",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# A base URL is published in files and env vars: printable, no whitespace, https (or loopback).
_URL: Final = re.compile(r"[!-~]+")
_URL_NAME: Final = re.compile(r"[a-z0-9_]{1,32}")


class RenderError(ValueError):
    """A product produced something unusable; names the credential and product only."""


class Unresolved(dict[str, Any]):
    """An instance's options that a product's discovery (:meth:`imsd.plugin.Product.discover`)
    has not completed: not yet, or it failed. Rendering the instance fails with *reason*,
    which is safe to show (it names the instance's problem, never a value)."""

    __slots__ = ("reason",)

    def __init__(self, options: Mapping[str, Any], reason: str) -> None:
        super().__init__(options)
        self.reason = reason


_RFC3339: Final = "%Y-%m-%dT%H:%M:%SZ"


def rfc3339(ts: float) -> str:
    """Unix seconds as RFC 3339 UTC with a ``Z``, truncated to the second."""
    if 0 <= ts <= MAX_TIMESTAMP:
        # What datetime.fromtimestamp(ts, UTC) shows, at a third of its cost (three per
        # refresh): it rounds to the microsecond, half to even, before the seconds.
        frac, whole = math.modf(ts)
        if round(frac * 1e6) >= 1_000_000:
            whole += 1
        return time.strftime(_RFC3339, time.gmtime(whole))
    return datetime.fromtimestamp(ts, UTC).strftime(_RFC3339)


def _single_line(value: object) -> bool:
    """A printable line (TAB allowed): no CR, LF, NUL, nor any Unicode line break."""
    # str.isprintable runs in C; a token is thousands of characters and is checked per file.
    return isinstance(value, str) and value.replace("\t", " ").isprintable()


# docker --env-file takes the value literally; systemd strips surrounding whitespace, unquotes a
# leading quote and unescapes backslashes. Values that would read differently in the two are
# refused rather than quoted. (A quote after the first character is literal in both.)
def _env_ambiguous(value: str) -> bool:
    """Leading or trailing whitespace (Unicode's, as ``str.isspace``), a leading quote, a
    backslash: see above. String methods, not a regex: a regex search tries every position
    of a token (38 µs for 1,400 characters, three values per credential)."""
    return (
        value[:1].isspace() or value[-1:].isspace() or value.startswith(('"', "'")) or "\\" in value
    )


def _where(cred: Credential, product: Product, instance: str) -> str:
    if instance == product.name:
        return f"{cred.name}: product {instance!r}"
    return f"{cred.name}: product {instance!r} ({product.name})"


def instances(
    cred: Credential, products: Mapping[str, Product]
) -> list[tuple[str, Product | None]]:
    """The one resolution step: each instance of *cred* (what its files, ``token.json``'s
    ``headers`` and ``?product=`` are keyed by) with its product plugin, None if not loaded.
    Its options are ``cred.product_options[instance]``."""
    return [(name, products.get(kind)) for name, kind in cred.product_instances]


def _label(name: str, view: TokenView) -> str:
    # A token is made of token characters, so a hostile product could use it as a header name.
    return "<redacted>" if view.access_token and view.access_token in name else repr(name)


def validated_options(product: Product, options: Mapping[str, Any]) -> Mapping[str, Any]:
    """*product*'s normalized *options*, or ValueError/TypeError naming the option. A plugin
    bug becomes a ValueError that names only the exception's type. ``base_url`` is the core's
    own option, valid for every product: checked here (https, or http to loopback), never shown
    to the product's validation, and kept in the result for :func:`product_urls`."""
    override = options.get(BASE_URL_OPTION)
    if BASE_URL_OPTION in options:
        if not isinstance(override, str) or not _URL.fullmatch(override):
            raise ValueError(f"{BASE_URL_OPTION}: expected a URL without spaces")
        if not https_or_loopback(override):
            raise ValueError(f"{BASE_URL_OPTION}: must be https (http only to a loopback host)")
        options = {k: v for k, v in options.items() if k != BASE_URL_OPTION}
    try:
        checked = product.validate_options(options)
    except (ValueError, TypeError):
        raise
    except Exception as e:  # a plugin bug must not take the daemon down
        raise ValueError(f"validate_options failed ({type(e).__name__})") from None
    if override is None:
        return checked
    return {**checked, BASE_URL_OPTION: override.rstrip("/")}


def instance_options(cred: Credential, product: Product, instance: str) -> Mapping[str, Any]:
    """*instance*'s options as its product validated them (validated now if they were not),
    or RenderError when a discovery left them :class:`Unresolved`."""
    options = cred.product_options
    if isinstance(options, ValidatedOptions) and instance in options:
        checked = options[instance]
    else:
        try:
            checked = validated_options(product, options.get(instance, {}))
        except (ValueError, TypeError) as e:  # option messages never hold the token
            raise RenderError(f"{_where(cred, product, instance)}: {e}") from None
    if isinstance(checked, Unresolved):
        raise RenderError(f"{_where(cred, product, instance)}: {checked.reason}")
    return checked


def _checked_url(where: str, what: str, url: object) -> str:
    if not isinstance(url, str) or not _URL.fullmatch(url) or not https_or_loopback(url):
        raise RenderError(f"{where}: {what} is not an https URL")
    return url


def product_urls(
    cred: Credential, product: Product, instance: str | None = None
) -> tuple[str | None, dict[str, str]]:
    """*instance*'s base URL (None: the product has no fixed host) and its other named base
    URLs (:meth:`imsd.plugin.Product.base_urls`), each validated: https (http to loopback
    only), printable, no whitespace."""
    instance = instance or product.name
    where = _where(cred, product, instance)
    options = instance_options(cred, product, instance)
    more = getattr(product, "base_urls", None)
    try:
        override = options.get(BASE_URL_OPTION)
        base = override if isinstance(override, str) else product.base_url(options)
        named = more(options) if callable(more) else {}
    except Exception as e:  # a plugin bug; its message may quote anything
        raise RenderError(f"{where}: failed to compute its base URL ({type(e).__name__})") from None
    if base is not None:
        base = _checked_url(where, "base_url", base)
    if not isinstance(named, Mapping):
        raise RenderError(f"{where}: base_urls is not a mapping")
    urls: dict[str, str] = {}
    for name, url in named.items():
        if not isinstance(name, str) or not _URL_NAME.fullmatch(name):
            raise RenderError(f"{where}: base_urls has an invalid name (use [a-z0-9_])")
        urls[name] = _checked_url(where, f"base_urls[{name!r}]", url)
    return base, urls


def token_view(
    cred: Credential, grant: Grant, product: Product, instance: str | None = None
) -> TokenView:
    """What *product* sees for *instance* (default: the product's own name). Its options are
    the ones :func:`imsd.registry.validate_products` left on *cred*, else validated now
    (defaults filled in)."""
    instance = instance or product.name
    checked = instance_options(cred, product, instance)
    return TokenView(
        credential=cred.name,
        access_token=grant.access_token.reveal(),
        token_type=grant.token_type,
        client_id=cred.client_id,
        org_id=cred.org_id,
        expires_at=grant.expires_at,
        options=checked,
    )


def _call(where: str, product: Product, what: str, view: TokenView) -> dict[Any, Any]:
    try:
        result = product.headers(view) if what == "headers" else product.env(view)
    except Exception as e:  # the message may quote the token: only its type is shown
        raise RenderError(f"{where}: failed to render {what} ({type(e).__name__})") from None
    if not isinstance(result, Mapping):
        raise RenderError(f"{where}: {what} is not a mapping")
    return dict(result)


def _checked_headers(where: str, headers: Mapping[Any, Any], view: TokenView) -> dict[str, str]:
    out: dict[str, str] = {}
    seen: set[str] = set()
    for name, value in headers.items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise RenderError(f"{where}: invalid header name")
        label = _label(name, view)
        key = name.lower()
        if key in _HOP_BY_HOP:
            raise RenderError(f"{where}: header {label} is reserved for the HTTP client")
        if key in seen:
            raise RenderError(f"{where}: header {label} given twice")
        # curl -H @file drops a header with an empty value instead of sending it.
        if not _single_line(value) or not value.strip():
            raise RenderError(f"{where}: header {label} has an empty or multi-line value")
        seen.add(key)
        out[name] = value
    return out


def product_headers(
    cred: Credential, grant: Grant, product: Product, instance: str | None = None
) -> dict[str, str]:
    """*product*'s headers for *instance* (default: the product's own name) with
    ``cred.extra_headers`` merged last (names compared without case), validated: RFC 7230
    names, no hop-by-hop names, no duplicates, single-line values."""
    instance = instance or product.name
    view = token_view(cred, grant, product, instance)
    where = _where(cred, product, instance)
    merged = _checked_headers(where, _call(where, product, "headers", view), view)
    extra = _checked_headers(f"{cred.name}: extra_headers", cred.extra_headers, view)
    for name, value in extra.items():
        for same in [k for k in merged if k.lower() == name.lower()]:
            del merged[same]
        merged[name] = value
    return merged


def product_env(
    cred: Credential, grant: Grant, product: Product, instance: str | None = None
) -> dict[str, str]:
    """*product*'s environment variables for *instance* (default: the product's own name),
    validated so that systemd and docker read the same."""
    instance = instance or product.name
    view = token_view(cred, grant, product, instance)
    where = _where(cred, product, instance)
    env = _call(where, product, "env", view)
    # The base URLs come from one place, base_url()/base_urls(), for every product.
    base, named = product_urls(cred, product, instance)
    if base is not None:
        env["ADOBE_BASE_URL"] = base
    env.update({f"ADOBE_{name.upper()}_BASE_URL": url for name, url in named.items()})
    for key, value in env.items():
        if not isinstance(key, str) or not _ENV_KEY.fullmatch(key):
            raise RenderError(f"{where}: invalid environment variable name")
        if not _single_line(value) or _env_ambiguous(value):
            raise RenderError(
                f"{where}: environment variable {_label(key, view)} has a value that is"
                " multi-line, quoted, has a backslash or surrounding whitespace"
            )
    return env


def _resolved(cred: Credential, products: Mapping[str, Product]) -> list[tuple[str, Product]]:
    out: list[tuple[str, Product]] = []
    for name, product in instances(cred, products):
        if product is None:
            raise RenderError(
                f"{cred.name}: unknown product {dict(cred.product_instances)[name]!r}"
            )
        out.append((name, product))
    return out


def instance_entry(
    cred: Credential, product: Product, instance: str, headers: Mapping[str, str]
) -> dict[str, Any]:
    """What ``token.json``'s ``instances`` and the socket's headers answer say of *instance*:
    its product (``type``), base URLs and *headers*."""
    base, named = product_urls(cred, product, instance)
    return {"type": product.name, "base_url": base, "base_urls": named, "headers": dict(headers)}


def _document(
    cred: Credential,
    grant: Grant,
    headers: Mapping[str, Mapping[str, str]],
    entries: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    return {
        "credential": cred.name,
        "access_token": grant.access_token.reveal(),
        "token_type": grant.token_type,
        "expires_at": rfc3339(grant.expires_at),
        "issued_at": rfc3339(grant.issued_at),
        "client_id": cred.client_id,
        "org_id": cred.org_id,
        "headers": {name: dict(h) for name, h in headers.items()},
        "instances": {name: dict(e) for name, e in entries.items()},
    }


def document(cred: Credential, grant: Grant, products: Mapping[str, Product]) -> dict[str, Any]:
    """The ``token.json`` document (also what the socket API serves)."""
    resolved = _resolved(cred, products)
    headers = {n: product_headers(cred, grant, p, n) for n, p in resolved}
    entries = {n: instance_entry(cred, p, n, headers[n]) for n, p in resolved}
    return _document(cred, grant, headers, entries)


def _indented(obj: Any, indent: str = "\n") -> str:
    """``json.dumps(obj, indent=2)``, byte for byte, for a document whose keys are strings:
    with an indent, json encodes in Python, generator upon generator (26 µs for a
    ``token.json``); here only the nesting is Python, every leaf the C encoder's."""
    if isinstance(obj, str):
        return encode_basestring_ascii(obj)
    inner = indent + "  "
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [
            f"{inner}{encode_basestring_ascii(k)}: {_indented(v, inner)}" for k, v in obj.items()
        ]
        return "{" + ",".join(items) + indent + "}"
    if isinstance(obj, list | tuple):
        return (
            "[" + ",".join([inner + _indented(v, inner) for v in obj]) + indent + "]"
            if obj
            else "[]"
        )
    return json.dumps(obj)  # a number, a boolean, null


@dataclass(frozen=True, slots=True)
class Unrendered:
    """Output files left out of a render, and why (the why names no value: safe to show)."""

    files: tuple[str, ...]
    reason: str

    def __str__(self) -> str:
        return f"{', '.join(self.files)} not written ({self.reason})"


def _instance_parts(
    cred: Credential, grant: Grant, selected: list[tuple[str, Product]]
) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, Any]], list[tuple[str, str]]]:
    """Headers and ``instances`` entries of the instances that render, and why the others
    do not."""
    headers: dict[str, dict[str, str]] = {}
    entries: dict[str, dict[str, Any]] = {}
    failed: list[tuple[str, str]] = []
    for name, p in selected:
        try:
            h = product_headers(cred, grant, p, name)
            entries[name] = instance_entry(cred, p, name, h)
        except RenderError as e:
            failed.append((name, str(e)))
            continue
        headers[name] = h
    return headers, entries, failed


def document_safe(
    cred: Credential, grant: Grant, products: Mapping[str, Product]
) -> dict[str, Any]:
    """The ``token.json`` document as :func:`render_safe` writes it: the instances that
    cannot be rendered (an unknown product, a discovery that failed) are left out, the token
    is there whatever they are. What the socket API serves."""
    known = [(n, p) for n, p in instances(cred, products) if p is not None]
    headers, entries, _ = _instance_parts(cred, grant, known)
    return _document(cred, grant, headers, entries)


def render_safe(
    cred: Credential, grant: Grant, products: Mapping[str, Product]
) -> tuple[dict[str, bytes], list[Unrendered]]:
    """File name → content for every output of ``cred.outputs`` that renders safely, and
    what was left out. Each instance's headers and env files stand alone: one that a product
    (or a value it carries) makes unsafe does not hold back the others, nor ``token`` and
    ``token.json``, which carry any printable value verbatim or JSON-escaped
    (``token.json`` then lacks only that instance's headers)."""
    kinds = set(cred.outputs)
    left_out: list[Unrendered] = []
    selected: list[tuple[str, Product]] = []
    kind_of = dict(cred.product_instances)
    for name, plugin in instances(cred, products):
        if plugin is not None:
            selected.append((name, plugin))
            continue
        files = [f"{name}.{kind}" for kind in ("headers", "env") if kind in kinds]
        files += [f"headers.{name} in token.json"] if "json" in kinds else []
        if files:
            why = f"{cred.name}: unknown product {kind_of[name]!r}"
            left_out.append(Unrendered(tuple(files), why))
    headers: dict[str, dict[str, str]] = {}
    entries: dict[str, dict[str, Any]] = {}
    if kinds & {"json", "headers"} or cred.templates:
        headers, entries, failed = _instance_parts(cred, grant, selected)
        for name, why in failed if kinds & {"json", "headers"} else ():
            files = [f"{name}.headers"] if "headers" in kinds else []
            files += [f"headers.{name} in token.json"] if "json" in kinds else []
            left_out.append(Unrendered(tuple(files), why))
    out: dict[str, bytes] = {}
    if "token" in kinds:
        out["token"] = grant.access_token.reveal().encode()
    if "json" in kinds:
        doc = _document(cred, grant, headers, entries)
        out["token.json"] = (_indented(doc) + "\n").encode()
    for name, product in selected:
        if "headers" in kinds and name in headers:
            lines = "".join(f"{k}: {v}\n" for k, v in headers[name].items())
            out[f"{name}.headers"] = lines.encode()
        if "env" in kinds:
            try:
                env = product_env(cred, grant, product, name)
            except RenderError as e:
                left_out.append(Unrendered((f"{name}.env",), str(e)))
                continue
            out[f"{name}.env"] = "".join(f"{k}={v}\n" for k, v in env.items()).encode()
    _render_templates(cred, grant, headers, entries, out, left_out)
    return out, left_out


def _render_templates(
    cred: Credential,
    grant: Grant,
    headers: Mapping[str, Mapping[str, str]],
    entries: Mapping[str, Mapping[str, Any]],
    out: dict[str, bytes],
    left_out: list[Unrendered],
) -> None:
    """The credential's templates (README "Templates"), filled in from what the other
    outputs carry: one whose placeholder has no value is left out, naming its line."""
    if not cred.templates:
        return
    values = variables(
        {
            "token": grant.access_token.reveal(),
            "token_type": grant.token_type,
            "expires_at": rfc3339(grant.expires_at),
            "expires_at_epoch": str(int(grant.expires_at)),
            "issued_at": rfc3339(grant.issued_at),
            "client_id": cred.client_id,
            "org_id": cred.org_id,
            "credential": cred.name,
        },
        {name: entry["base_url"] for name, entry in entries.items()},
        headers,
    )
    for tpl in cred.templates:
        try:
            data = render(tpl, values).encode()
        except TemplateError as e:
            left_out.append(Unrendered((tpl.destination,), f"{cred.name}: template {e}"))
            continue
        out[tpl.destination] = data if tpl.mode is None else ModedBytes(data, tpl.mode)


def render_outputs(
    cred: Credential, grant: Grant, products: Mapping[str, Product]
) -> dict[str, bytes]:
    """File name → content for every output kind in ``cred.outputs``, or RenderError for the
    first one that cannot be rendered safely."""
    out, left_out = render_safe(cred, grant, products)
    if left_out:
        raise RenderError(left_out[0].reason)
    return out
