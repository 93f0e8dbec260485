"""Output templates (README "Templates"): a credential's own files, such as a ``.netrc`` or a
Postman environment, filled in from its token on every new one (pure).

The engine is :class:`string.Template`'s syntax and nothing more: ``$name`` and ``${name}``
are replaced by a value, ``$$`` is a dollar. No expressions, no attribute access, no loops, no
file inclusion: a template cannot run code or read anything, whatever its text. Every
placeholder is checked when the credential file is parsed, so a typo is a credential error
naming the file and the line; what can only be known with a token in hand (a header a product
did not produce) is a render error naming the same.

Variables: ``token``, ``token_type``, ``expires_at`` (RFC 3339), ``expires_at_epoch``,
``issued_at``, ``client_id``, ``org_id``, ``credential``, and per instance (product)
``${INSTANCE:base_url}`` and ``${INSTANCE:header:NAME}`` (header names without case).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

__all__ = [
    "GLOBALS",
    "MAX_TEMPLATE_SIZE",
    "ModedBytes",
    "OutputTemplate",
    "TemplateError",
    "check_destination",
    "parse_mode",
    "parse_template",
    "render",
    "variables",
]

#: The variables every template may use, whatever the credential's products.
GLOBALS: Final = (
    "token",
    "token_type",
    "expires_at",
    "expires_at_epoch",
    "issued_at",
    "client_id",
    "org_id",
    "credential",
)
MAX_TEMPLATE_SIZE: Final = 64 * 1024
# A destination is one file in the credential's output directory: no path, no dot file (the
# sink's temporaries and its list of template files are dot files), and none of the files
# the credential's other outputs may have.
_DESTINATION: Final = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
_RESERVED: Final = re.compile(r"token|token\.json|.*\.(headers|env)")
_MODE: Final = re.compile(r"0?[0-7]{3}")


class _Syntax(string.Template):
    # ${...} also takes the per-instance names: an instance name has dots and dashes, a
    # header name dashes; ":" separates the parts (it is in neither).
    braceidpattern = r"(?a:[A-Za-z0-9_][A-Za-z0-9_.:-]*)"


class ModedBytes(bytes):
    """A rendered template that asks for its own mode: the sink narrows its ``file_mode``
    with it, never widens it."""

    mode: int

    def __new__(cls, data: bytes, mode: int) -> ModedBytes:
        self = super().__new__(cls, data)
        self.mode = mode
        return self


class TemplateError(ValueError):
    """A template that cannot be used; the message names the line, never a value."""


@dataclass(frozen=True, slots=True)
class OutputTemplate:
    """One ``[[template]]`` of a credential, checked: its text split into literal text and
    placeholders (each with its line), where the file goes and with which mode."""

    destination: str
    origin: str  # where its text came from: a file, or "template[N].content"
    parts: tuple[str | tuple[str, int], ...]  # literal text, or (variable, line)
    mode: int | None = None  # None: the daemon's file_mode; else narrowed by it

    def names(self) -> frozenset[str]:
        return frozenset(p[0] for p in self.parts if isinstance(p, tuple))


def check_destination(value: object, taken: Iterable[str] = ()) -> str:
    """*value* as a destination file name, or TemplateError saying why not."""
    if not isinstance(value, str) or not _DESTINATION.fullmatch(value) or value in ("..",):
        raise TemplateError(
            "destination must be a file name (1-64 of A-Z a-z 0-9 . _ -, not starting with a"
            " dot): templates are written in the credential's output directory only"
        )
    if _RESERVED.fullmatch(value) or value in set(taken):
        raise TemplateError(f"destination {value!r} is a name the credential's files use")
    return value


def parse_mode(value: object) -> int | None:
    """A mode given as an octal string (``"0600"``), or None if not given."""
    if value is None:
        return None
    if not isinstance(value, str) or not _MODE.fullmatch(value):
        raise TemplateError('mode must be an octal string such as "0600"')
    mode = int(value, 8)
    if mode & 0o400 == 0:
        raise TemplateError("mode must let the owner read the file")
    return mode


def _known(name: str, instances: Iterable[str]) -> bool:
    if name in GLOBALS:
        return True
    instance, sep, rest = name.partition(":")
    if not sep or instance not in set(instances):
        return False
    kind, _, header = rest.partition(":")
    return rest == "base_url" or (kind == "header" and bool(header))


def _hint(name: str, instances: Iterable[str]) -> str:
    instance = name.partition(":")[0]
    if ":" in name and instance not in set(instances):
        return f" (instances: {', '.join(instances) or 'none'})"
    if ":" in name:
        return " (use ${INSTANCE:base_url} or ${INSTANCE:header:NAME})"
    return f" (variables: {', '.join(GLOBALS)}; per instance ${{INSTANCE:...}})"


def parse_template(
    text: str,
    *,
    destination: str,
    origin: str,
    instances: Iterable[str],
    mode: int | None = None,
    first_line: int = 1,
) -> OutputTemplate:
    """*text* checked: every placeholder is a known variable (or TemplateError naming its
    line and the placeholder; *first_line* is the line the text starts on in its file)."""
    names = tuple(instances)
    parts: list[str | tuple[str, int]] = []
    at = 0
    for m in _Syntax.pattern.finditer(text):
        line = first_line + text.count("\n", 0, m.start())
        if m.start() > at:
            parts.append(text[at : m.start()])
        at = m.end()
        if m.group("escaped") is not None:
            parts.append("$")
            continue
        name = m.group("named") or m.group("braced")
        if name is None:  # the "invalid" group: a $ that starts nothing
            raise TemplateError(
                f"{origin}: line {line}: a $ that starts no placeholder (write $$ for a dollar)"
            )
        if not _known(name, names):
            raise TemplateError(
                f"{origin}: line {line}: unknown variable {name!r}{_hint(name, names)}"
            )
        parts.append((name, line))
    if at < len(text):
        parts.append(text[at:])
    return OutputTemplate(destination=destination, origin=origin, parts=tuple(parts), mode=mode)


def variables(
    globals_: Mapping[str, str],
    base_urls: Mapping[str, str | None],
    headers: Mapping[str, Mapping[str, str]],
) -> dict[str, str]:
    """The values a template is filled in with: *globals_* (see :data:`GLOBALS`), each
    instance's base URL (absent when its product has none) and headers (names lower-cased)."""
    out = dict(globals_)
    for instance, url in base_urls.items():
        if url is not None:
            out[f"{instance}:base_url"] = url
    for instance, fields in headers.items():
        for header, value in fields.items():
            out[f"{instance}:header:{header.lower()}"] = value
    return out


def _key(name: str) -> str:
    instance, sep, rest = name.partition(":")
    kind, _, header = rest.partition(":")
    return f"{instance}:header:{header.lower()}" if sep and kind == "header" else name


def render(template: OutputTemplate, values: Mapping[str, str]) -> str:
    """*template* filled in from *values* (from :func:`variables`), or TemplateError naming
    the line of a placeholder that has no value with this token."""
    out: list[str] = []
    for part in template.parts:
        if isinstance(part, str):
            out.append(part)
            continue
        name, line = part
        value = values.get(_key(name))
        if value is None:
            raise TemplateError(
                f"{template.origin}: line {line}: {name!r} has no value"
                " (the instance did not render, or has no such header or base URL)"
            )
        out.append(value)
    return "".join(out)
