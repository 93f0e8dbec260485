"""A small client for applications: read a token from imsd's files or its socket.

Import-light on purpose (no daemon modules): an application can ``from imsd.client import
token`` without pulling in the daemon. Every function checks expiry, so a caller never
receives a token that is already dead (or about to be, within *min_validity* seconds).

    from imsd.client import headers
    httpx.get(url, headers=headers("aep", product="aep"))
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import httpx

__all__ = [
    "DEFAULT_OUTPUT_DIR",
    "DEFAULT_SOCKET",
    "ImsdUnavailable",
    "headers",
    "request",
    "token",
    "token_document",
]

DEFAULT_OUTPUT_DIR: Final = Path(os.environ.get("IMSD_OUTPUT_DIR", "/run/imsd/tokens"))
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
    method: str, path: str, *, socket: Path | None = None, timeout: float = 10.0
) -> dict[str, Any]:
    """One request to the daemon's socket API; the JSON body, or ImsdUnavailable."""
    sock = socket or DEFAULT_SOCKET
    transport = httpx.HTTPTransport(uds=str(sock))
    try:
        with httpx.Client(transport=transport, base_url="http://imsd", timeout=timeout) as c:
            resp = c.request(method, path)
    except (httpx.ConnectError, FileNotFoundError) as e:
        raise ImsdUnavailable(f"imsd is not running (no socket at {sock})") from e
    except PermissionError as e:
        raise ImsdUnavailable(f"no permission to use the imsd socket {sock}") from e
    except httpx.HTTPError as e:
        raise ImsdUnavailable(f"imsd socket {sock}: {type(e).__name__}") from e
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
    output_dir: Path | None = None,
    socket: Path | None = None,
    min_validity: float = 60.0,
) -> dict[str, Any]:
    """The ``token.json`` document of *name*: from *socket* if given, else from the files."""
    if socket is not None:
        return _check(
            request("GET", f"/v1/credentials/{name}/token", socket=socket), name, min_validity
        )
    path = (output_dir or DEFAULT_OUTPUT_DIR) / name / "token.json"
    try:
        doc: dict[str, Any] = json.loads(path.read_bytes())
    except FileNotFoundError as e:
        raise ImsdUnavailable(f"{path} does not exist (is imsd running?)") from e
    except PermissionError as e:
        raise ImsdUnavailable(f"no permission to read {path}") from e
    except ValueError as e:
        raise ImsdUnavailable(f"{path} is not valid JSON") from e
    if not isinstance(doc, dict):
        raise ImsdUnavailable(f"{path} is not a token document")
    return _check(doc, name, min_validity)


def token(name: str, **kwargs: Any) -> str:
    """The access token of credential *name* (see :func:`token_document` for options)."""
    return str(token_document(name, **kwargs)["access_token"])


def headers(name: str, product: str | None = None, **kwargs: Any) -> dict[str, str]:
    """The request headers of *name* for *product* (default: the credential's first)."""
    doc = token_document(name, **kwargs)
    per_product: dict[str, dict[str, str]] = doc.get("headers") or {}
    if not per_product:
        raise ImsdUnavailable(f"{name}: token document has no headers")
    key = product or next(iter(per_product))
    if key not in per_product:
        raise ImsdUnavailable(f"{name} has no product {key!r} (it has: {', '.join(per_product)})")
    return dict(per_product[key])
