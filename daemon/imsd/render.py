"""Rendering a credential's token into the bytes of its output files (pure).

Products produce header and env mappings through the plugin API; everything they return is
validated here, so no plugin can inject a header line, an env line or a stray newline into a
file that ``curl -H @file`` or systemd's ``EnvironmentFile=`` will read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

from imsd.model import Credential, Grant
from imsd.plugin import Product, TokenView

__all__ = ["RenderError", "document", "render_outputs", "rfc3339", "token_view"]

_HEADER_NAME: Final = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_ENV_KEY: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _bad_value(value: object) -> bool:
    """Not a single printable line (TAB allowed): a newline of any kind could inject."""
    return not isinstance(value, str) or not all(c == "\t" or c.isprintable() for c in value)


# docker --env-file takes values literally; systemd strips quotes and expands backslashes.
# Values that would read differently in the two are refused rather than quoted.
_ENV_UNSAFE: Final = re.compile(r"""^\s|\s$|^["']|\\""")


class RenderError(ValueError):
    """A product produced something unusable; names the credential and product only."""


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def token_view(cred: Credential, grant: Grant, product: Product) -> TokenView:
    return TokenView(
        credential=cred.name,
        access_token=grant.access_token.reveal(),
        token_type=grant.token_type,
        client_id=cred.client_id,
        org_id=cred.org_id,
        expires_at=grant.expires_at,
        options=cred.product_options.get(product.name, {}),
    )


def _call(cred: Credential, product: Product, what: str, view: TokenView) -> dict[str, str]:
    try:
        result = product.headers(view) if what == "headers" else product.env(view)
    except Exception as e:  # a plugin bug must not take the daemon down
        raise RenderError(
            f"{cred.name}: product {product.name!r} failed to render {what} ({type(e).__name__})"
        ) from None
    if not isinstance(result, Mapping):
        raise RenderError(f"{cred.name}: product {product.name!r} returned non-mapping {what}")
    return dict(result)


def _headers(cred: Credential, product: Product, view: TokenView) -> dict[str, str]:
    headers = _call(cred, product, "headers", view)
    merged = {**headers, **cred.extra_headers}
    for name, value in merged.items():
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise RenderError(f"{cred.name}: product {product.name!r}: invalid header name")
        if _bad_value(value):
            raise RenderError(
                f"{cred.name}: product {product.name!r}: header {name!r} has an invalid value"
            )
    return merged


def _env(cred: Credential, product: Product, view: TokenView) -> dict[str, str]:
    env = _call(cred, product, "env", view)
    for key, value in env.items():
        if not isinstance(key, str) or not _ENV_KEY.match(key):
            raise RenderError(f"{cred.name}: product {product.name!r}: invalid env name")
        if _bad_value(value) or _ENV_UNSAFE.search(str(value)):
            raise RenderError(
                f"{cred.name}: product {product.name!r}: env {key!r} has an unsafe value"
            )
    return env


def _products(cred: Credential, products: Mapping[str, Product]) -> list[Product]:
    missing = [p for p in cred.products if p not in products]
    if missing:
        raise RenderError(f"{cred.name}: unknown product {missing[0]!r}")
    return [products[p] for p in cred.products]


def document(cred: Credential, grant: Grant, products: Mapping[str, Product]) -> dict[str, Any]:
    """The ``token.json`` document (also what the socket API serves)."""
    headers = {
        p.name: _headers(cred, p, token_view(cred, grant, p)) for p in _products(cred, products)
    }
    return {
        "credential": cred.name,
        "access_token": grant.access_token.reveal(),
        "token_type": grant.token_type,
        "expires_at": rfc3339(grant.expires_at),
        "issued_at": rfc3339(grant.issued_at),
        "client_id": cred.client_id,
        "org_id": cred.org_id,
        "headers": headers,
    }


def render_outputs(
    cred: Credential, grant: Grant, products: Mapping[str, Product]
) -> dict[str, bytes]:
    """File name → content for every output the credential asks for."""
    out: dict[str, bytes] = {}
    kinds = set(cred.outputs)
    if "token" in kinds:
        out["token"] = grant.access_token.reveal().encode()
    if "json" in kinds:
        doc = document(cred, grant, products)
        out["token.json"] = (json.dumps(doc, indent=2) + "\n").encode()
    for product in _products(cred, products):
        view = token_view(cred, grant, product)
        if "headers" in kinds:
            lines = [f"{k}: {v}" for k, v in _headers(cred, product, view).items()]
            out[f"{product.name}.headers"] = ("\n".join(lines) + "\n").encode()
        if "env" in kinds:
            lines = [f"{k}={v}" for k, v in _env(cred, product, view).items()]
            out[f"{product.name}.env"] = ("\n".join(lines) + "\n").encode()
    return out
