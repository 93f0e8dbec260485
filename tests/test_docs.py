"""The README's reference sections stay true to the code."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

from imsd.config import RELOAD, Reload, Settings
from imsd.flows import PERMANENT_CODES

README = (Path(__file__).parent.parent / "README.md").read_text()


def _between(start: str, end: str) -> str:
    return README[README.index(start) : README.index(end)]


def test_config_reference_lists_every_setting_with_its_default() -> None:
    table = _between("<!-- config-reference:start -->", "<!-- config-reference:end -->")
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| ([^|]+) \|", table, re.M))
    assert set(rows) == set(Settings.model_fields)
    defaults = Settings()
    for key, shown in rows.items():
        value = getattr(defaults, key)
        literal = re.fullmatch(r"`([^`]*)`", shown.strip())
        if literal is None:  # prose ("the daemon's uid and root", "none"): no literal default
            assert value in (None, []), key
            continue
        text = literal.group(1)
        if key.endswith("_mode"):
            assert int(text, 8) == value, key
        elif isinstance(value, float | int):
            assert float(text) == float(value), key
        elif isinstance(value, list):  # a list as its env form, comma-separated
            assert text == ",".join(str(v) for v in value), key
        else:
            assert text == str(value), key


def test_reload_section_matches_the_reload_table() -> None:
    section = _between("<!-- reload:start -->", "<!-- reload:end -->")
    applied, restart = section.split("- kept until a restart")
    for key, how in RELOAD.items():
        part = applied if how is Reload.APPLIED else restart
        assert f"`{key}`" in part, (key, how)


def test_troubleshooting_explains_every_permanent_error() -> None:
    section = _between("## Troubleshooting", "## States")
    for code in PERMANENT_CODES - {"invalid_request", "unsupported_grant_type"}:
        assert f"`{code}`" in section, code


def _code_part(line: str) -> str:
    return line.split("#", 1)[0]


def test_every_toml_and_json_example_parses() -> None:
    """A reader copies these: each ```toml / ```json block is valid as written. A block with
    "…" outside a comment is a fragment and skipped."""
    blocks = re.findall(r"^([ \t]*)```(toml|json)\n(.*?)^\1```", README, re.M | re.S)
    assert len(blocks) >= 3
    parsed = 0
    for indent, kind, body in blocks:
        text = "\n".join(line.removeprefix(indent) for line in body.splitlines())
        if any("…" in _code_part(line) for line in text.splitlines()):
            continue
        try:
            tomllib.loads(text) if kind == "toml" else json.loads(text)
        except ValueError as e:
            raise AssertionError(f"README {kind} example does not parse ({e}):\n{text}") from e
        parsed += 1
    assert parsed >= 3


def test_inline_settings_examples_are_valid() -> None:
    """`key = value` snippets naming a setting (e.g. `file_mode = "0640"`) are accepted."""
    snippets = [
        s
        for s in re.findall(r"`([a-z_]+ = [^`]+)`", README)
        if s.split()[0] in Settings.model_fields
    ]
    assert snippets
    for snippet in snippets:
        Settings.model_validate(tomllib.loads(snippet))
