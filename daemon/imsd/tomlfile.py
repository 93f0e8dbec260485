"""The TOML files imsd writes (``imsd import``'s credentials, ``imsd demo``'s): one writer.

Values and keys go through tomli-w, which escapes everything a TOML string must (quotes,
backslashes, every control character, U+007F), so no value can end its line and start
another. Comments go through :func:`comment`, the one escaping function for text outside a
value. :func:`render` then reads the bytes back with the daemon's own reader
(:func:`imsd.credentials.decode`) and refuses them unless they give back the document it was
given, key for key and value for value: what a file says is what its writer meant.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from imsd.credentials import decode
from imsd.model import CredentialError

__all__ = ["UnfaithfulWrite", "comment", "first_difference", "render"]


class UnfaithfulWrite(ValueError):
    """The bytes would not read back as the document (names the key, never a value)."""


def _escape(c: str) -> str:
    if c == "\\":
        return "\\\\"
    if c.isprintable():
        return c
    n = ord(c)
    return f"\\u{n:04x}" if n <= 0xFFFF else f"\\U{n:08x}"


def comment(text: str) -> str:
    """*text* as one comment line, ``# `` and *text* with a backslash doubled and every
    character that is not printable (line breaks of any kind, other control characters,
    bidirectional overrides, surrogates) written as a TOML ``\\uXXXX`` escape: the text never
    ends the line, and reads back unambiguously."""
    return "# " + "".join(_escape(c) for c in text)


def _plain(value: Any) -> Any:
    """*value* as a TOML reader returns it (tuples are arrays, read back as lists)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def first_difference(meant: Any, read: Any, where: str = "") -> str | None:
    """The dotted key where *read* differs from *meant* (``(top level)`` for the whole
    document), or None when they are the same document."""
    here = where or "(top level)"
    if isinstance(meant, Mapping) and isinstance(read, Mapping):
        for key in [*meant, *(k for k in read if k not in meant)]:
            if key not in meant or key not in read:
                return f"{where}.{key}" if where else str(key)
            found = first_difference(meant[key], read[key], f"{where}.{key}" if where else key)
            if found is not None:
                return found
        return None
    if isinstance(meant, list) and isinstance(read, list):
        if len(meant) != len(read):
            return here
        for i, (m, r) in enumerate(zip(meant, read, strict=True)):
            found = first_difference(m, r, f"{here}[{i}]")
            if found is not None:
                return found
        return None
    return None if type(meant) is type(read) and meant == read else here


def render(path: Path, document: Mapping[str, Any], *, comments: Sequence[str] = ()) -> bytes:
    """The bytes of *document* as the TOML file *path* (which only names it in errors and
    picks the reader by its suffix), *comments* first, one :func:`comment` line each.
    Raises :class:`UnfaithfulWrite` unless the daemon's reader gives back *document* from
    them, or when a value is one TOML cannot hold."""
    meant = _plain(document)
    head = "".join(comment(c) + "\n" for c in comments)
    try:
        data = (head + tomli_w.dumps(meant)).encode()
    except (TypeError, ValueError) as e:  # a None, a lone surrogate: no value in the message
        raise UnfaithfulWrite(f"{path}: cannot be written as TOML ({type(e).__name__})") from None
    try:
        read = decode(path, data)
    except CredentialError as e:
        raise UnfaithfulWrite(f"{path}: would not read back ({e.reason}): not written") from None
    key = first_difference(meant, read)
    if key is not None:
        raise UnfaithfulWrite(f"{path}: {key} would read back differently: not written")
    return data
