"""The state file: tokens (and rotated refresh tokens) that survive a restart.

``STATE_DIR/tokens.json`` (directory 0700, file 0600, written atomically) holds, per
credential name, the grant and the *identity* of the credential that obtained it (a hash of
auth method, client id, secret, org, scopes and IMS host). On start a stored token is reused
only under the same identity and while it is still valid beyond the refresh margin, so a
restart costs IMS nothing, and a changed secret or scope can never serve a stale token. A
corrupt, foreign or newer-version file is reported and ignored, never fatal.

Encoding and decoding are pure; :class:`StateFile` does the I/O.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog

from imsd.flows import is_bearer_token
from imsd.model import Grant, Secret, usable_time
from imsd.sinks import atomic_write, open_private_dir, remove_stale_temporaries

__all__ = ["STATE_VERSION", "StateError", "StateFile", "Stored", "decode", "encode"]

log = structlog.get_logger("imsd.persist")

STATE_VERSION: Final = 1
FILENAME: Final = "tokens.json"
_KIND: Final = "imsd-state"


class StateError(ValueError):
    """The state file cannot be used; the message never contains a token."""


@dataclass(frozen=True, slots=True)
class Stored:
    identity: str
    grant: Grant | None = None
    refresh_token: Secret | None = None


def encode(entries: Mapping[str, Stored]) -> bytes:
    creds: dict[str, Any] = {}
    for name, s in sorted(entries.items()):
        item: dict[str, Any] = {"identity": s.identity}
        if s.grant is not None:
            item["grant"] = {
                "access_token": s.grant.access_token.reveal(),
                "token_type": s.grant.token_type,
                "issued_at": s.grant.issued_at,
                "expires_at": s.grant.expires_at,
            }
        if s.refresh_token is not None:
            item["refresh_token"] = s.refresh_token.reveal()
        creds[name] = item
    doc = {"kind": _KIND, "version": STATE_VERSION, "credentials": creds}
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


def _grant(raw: Any) -> Grant:
    if not isinstance(raw, dict):
        raise StateError("grant is not an object")
    token, ttype = raw.get("access_token"), raw.get("token_type", "bearer")
    issued, expires = raw.get("issued_at"), raw.get("expires_at")
    if not isinstance(token, str) or not token or not isinstance(ttype, str):
        raise StateError("grant lacks an access token")
    if not is_bearer_token(token) or ttype.lower() != "bearer":
        raise StateError("grant is not a bearer token")  # what IMS answers are held to
    if not (usable_time(issued) and usable_time(expires)):
        raise StateError("grant times are not finite numbers in range")
    assert isinstance(issued, int | float)
    assert isinstance(expires, int | float)
    if expires <= issued:
        raise StateError("grant expires before it was issued")
    return Grant(Secret(token), ttype, float(issued), float(expires))


def _not_json(name: str) -> Any:
    """NaN and Infinity are not JSON (RFC 8259), although Python's parser accepts them."""
    raise ValueError(name)


def decode(data: bytes) -> dict[str, Stored]:
    """Parse a state file; raise StateError for anything but a well-formed current one.
    Individual malformed entries are dropped (and reported by the caller's count)."""
    try:
        doc = json.loads(data, parse_constant=_not_json)
    except (ValueError, UnicodeDecodeError):
        raise StateError("not JSON") from None
    if not isinstance(doc, dict) or doc.get("kind") != _KIND:
        raise StateError("not an imsd state file")
    if doc.get("version") != STATE_VERSION:
        raise StateError(f"unsupported state version {doc.get('version')!r}")
    creds = doc.get("credentials")
    if not isinstance(creds, dict):
        raise StateError("credentials is not an object")
    out: dict[str, Stored] = {}
    for name, item in creds.items():
        try:
            if not isinstance(item, dict) or not isinstance(item.get("identity"), str):
                raise StateError("entry lacks an identity")
            grant = _grant(item["grant"]) if "grant" in item else None
            rt = item.get("refresh_token")
            if rt is not None and not (isinstance(rt, str) and rt):
                raise StateError("refresh_token is not a string")
            out[str(name)] = Stored(item["identity"], grant, Secret(rt) if rt else None)
        except StateError as e:
            log.warning("state.entry_ignored", credential=str(name), reason=str(e))
    return out


class StateFile:
    """Load once at start, save after every change (from a worker thread)."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.path = state_dir / FILENAME

    def load(self) -> dict[str, Stored]:
        remove_stale_temporaries(self.dir, FILENAME)  # a save killed before its rename
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as e:
            log.error("state.unreadable", path=str(self.path), error=e.strerror)
            return {}
        try:
            entries = decode(data)
        except StateError as e:
            log.error("state.ignored", path=str(self.path), reason=str(e))
            return {}
        log.info("state.loaded", path=str(self.path), credentials=len(entries))
        return entries

    def save(self, entries: Mapping[str, Stored]) -> None:
        # Never through a symlink, never a directory another user planted: it holds secrets.
        fd = open_private_dir(self.dir, 0o700)
        try:
            atomic_write(fd, FILENAME, encode(entries), mode=0o600)
        finally:
            os.close(fd)
