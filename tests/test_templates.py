"""Output templates (README "Templates"): the engine (table tests and a property: no input
runs code or reads a file), the credential file's ``[[template]]`` (every error names the
file and the line), the sink's handling of their files, and a daemon that renders a .netrc
and a Postman environment and renders them again on every new token."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from imsd.credentials import parse_credentials
from imsd.fakeims.server import FakeIms
from imsd.model import CredentialError, Grant, Secret
from imsd.registry import load_registry, validate_products
from imsd.render import render_safe
from imsd.sinks import FileSink
from imsd.templates import (
    GLOBALS,
    ModedBytes,
    TemplateError,
    check_destination,
    parse_mode,
    parse_template,
    render,
    variables,
)

from tests.support import ORG, uds, wait_for, write_cred

BASE: dict[str, Any] = {
    "auth": "oauth_server_to_server",
    "client_id": "cid",
    "client_secret": "p8e-VerySecretValue-0123456789",
    "org_id": ORG,
    "scopes": ["openid"],
}
TOKEN = "tok-abc.def_ghi"
GRANT = Grant(Secret(TOKEN), "bearer", 1_800_000_000.0, 1_800_086_400.0)
PRODUCTS = load_registry().products


def tpl(text: str, instances: tuple[str, ...] = ("aep",)) -> Any:
    return parse_template(text, destination="out", origin="t.tmpl", instances=instances)


VALUES = variables(
    {"token": TOKEN, "org_id": ORG},
    {"aep": "https://platform.adobe.io", "generic": None},
    {"aep": {"x-api-key": "cid", "X-Sandbox-Name": "dev"}},
)


# -- the engine ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain text\n", "plain text\n"),
        ("$token", TOKEN),
        ("Bearer ${token}x", f"Bearer {TOKEN}x"),
        ("$token.", f"{TOKEN}."),  # a dot ends a bare name
        ("cost: $$5", "cost: $5"),
        ("${aep:base_url}/data", "https://platform.adobe.io/data"),
        ("${aep:header:x-sandbox-name}", "dev"),  # header names without case
        ("${aep:header:X-API-KEY}", "cid"),
        ("{{token}} %(token)s {token}", "{{token}} %(token)s {token}"),  # other engines' syntax
    ],
)
def test_render(text: str, expected: str) -> None:
    assert render(tpl(text), VALUES) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a\n$tokn", "t.tmpl: line 2: unknown variable 'tokn' (variables: token, token_type,"),
        ("\n\n${aepx:base_url}", "t.tmpl: line 3: unknown variable 'aepx:base_url' (instances:"),
        ("${aep:headers}", "line 1: unknown variable 'aep:headers' (use ${INSTANCE:base_url}"),
        ("${aep:header:}", "unknown variable 'aep:header:'"),
        ("x\ny $ z", "t.tmpl: line 2: a $ that starts no placeholder (write $$ for a dollar)"),
        ("${token", "line 1: a $ that starts no placeholder"),
        ("${token.__class__}", "unknown variable 'token.__class__'"),
        ("${__import__('os')}", "a $ that starts no placeholder"),
    ],
)
def test_parse_errors_name_the_line_and_placeholder(text: str, message: str) -> None:
    with pytest.raises(TemplateError) as e:
        tpl(text)
    assert message in str(e.value)


def test_render_error_names_the_line_never_a_value() -> None:
    t = tpl("ok $token\n${aep:header:x-missing}\n")
    with pytest.raises(TemplateError) as e:
        render(t, VALUES)
    assert str(e.value).startswith("t.tmpl: line 2: 'aep:header:x-missing' has no value")
    assert TOKEN not in str(e.value)
    with pytest.raises(TemplateError, match="'aep:base_url' has no value"):
        render(tpl("${aep:base_url}"), {})


@pytest.mark.parametrize(
    "bad", ["", ".netrc", "a/b", "../x", "token", "token.json", "aep.env", "x.headers", "a" * 65, 3]
)
def test_destinations(bad: Any) -> None:
    with pytest.raises(TemplateError):
        check_destination(bad)
    assert check_destination("netrc") == "netrc"
    assert check_destination("postman_env.json") == "postman_env.json"
    with pytest.raises(TemplateError, match="files use"):
        check_destination("netrc", ["netrc"])


def test_modes() -> None:
    assert parse_mode(None) is None
    assert parse_mode("0600") == 0o600
    assert parse_mode("640") == 0o640
    for bad in ("0200", "rw", 600, "07777", "0o600"):
        with pytest.raises(TemplateError):
            parse_mode(bad)
    assert ModedBytes(b"x", 0o600).mode == 0o600
    assert ModedBytes(b"x", 0o600) == b"x"


#: Text that hits the syntax often: dollars, braces, colons and the variables' names.
TEXTS = st.lists(
    st.sampled_from(
        [
            "$",
            "$$",
            "{",
            "}",
            ":",
            "token",
            "org_id",
            "aep",
            "header",
            "x",
            " ",
            "\n",
            "(",
            ")",
            ".",
            "_",
            "/etc/passwd",
            "__import__",
            "é",
        ]
    )
    | st.text(max_size=5),
    max_size=30,
).map("".join)


@given(TEXTS)
def test_no_text_runs_code_or_reads_a_file(text: str) -> None:
    """Whatever the text: it is refused with TemplateError, or it renders exactly as the
    standard library's string.Template substitutes it (literal text, placeholders replaced
    by values, nothing else)."""
    import string

    values = {name: f"<{name}>" for name in GLOBALS}
    values.update({"aep:base_url": "<url>", "aep:header:x": "<x>"})
    try:
        t = tpl(text)
    except TemplateError:
        return
    try:
        out = render(t, values)
    except TemplateError:
        assert not {n.lower() for n in t.names()} <= set(values)  # a header nobody gave
        return

    class Std(string.Template):
        braceidpattern = r"(?a:[A-Za-z0-9_][A-Za-z0-9_.:-]*)"

    assert out == Std(text).substitute({n: values[n.lower()] for n in t.names()})


# -- the credential file ---------------------------------------------------------------------


def parse(tmp_path: Path, extra: str) -> Any:
    path = tmp_path / "c.toml"
    body = "".join(f"{k} = {json.dumps(v)}\n" for k, v in BASE.items())
    path.write_text(body + 'products = ["aep", "generic"]\n' + extra)
    return parse_credentials(path, path.read_bytes(), env={})


def test_credential_templates(tmp_path: Path) -> None:
    (tmp_path / "netrc.tmpl").write_text("machine api\n  password $token\n")
    [cred] = parse(
        tmp_path,
        '[[template]]\nsource = "netrc.tmpl"\ndestination = "netrc"\nmode = "0600"\n'
        '[[template]]\ncontent = "${aep:base_url} $org_id"\ndestination = "base"\n',
    )
    netrc, base = cred.templates
    assert (netrc.destination, netrc.mode, netrc.origin) == (
        "netrc",
        0o600,
        str(tmp_path / "netrc.tmpl"),
    )
    assert (base.destination, base.mode) == ("base", None)
    # An edited template source is noticed by a re-scan, as a secret file is.
    assert tmp_path / "netrc.tmpl" in [p for p, _ in cred.sources]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            '[[template]]\ncontent = "x\\n$nope"\ndestination = "a"\n',
            "template[0]: {d}/c.toml: template[0].content: line 2: unknown variable 'nope'",
        ),
        (
            '[[template]]\nsource = "t.tmpl"\ndestination = "a"\n',
            "template[0]: {d}/t.tmpl: line 3: unknown variable 'cja:base_url'"
            " (instances: aep, generic)",
        ),
        (
            '[[template]]\nsource = "missing"\ndestination = "a"\n',
            "template[0].source: cannot read {d}/missing",
        ),
        (
            '[[template]]\nsource = "../x"\ndestination = "a"\n',
            "may not leave the credentials directory",
        ),
        ('[[template]]\ncontent = "x"\ndestination = "../a"\n', "must be a file name"),
        ('[[template]]\ncontent = "x"\n', "must be a file name"),
        ('[[template]]\ncontent = "x"\nsource = "y"\ndestination = "a"\n', "give one of"),
        ('[[template]]\ncontent = "x"\ndestination = "aep.env"\n', "files use"),
        (
            '[[template]]\ncontent = "x"\ndestination = "a"\n'
            '[[template]]\ncontent = "y"\ndestination = "a"\n',
            "template[1]: destination 'a'",
        ),
        (
            '[[template]]\ncontent = "x"\ndestination = "a"\nmdoe = "0600"\n',
            "template[0].mdoe: unknown key 'mdoe': did you mean 'mode'?",
        ),
        ('[[template]]\ncontent = "x"\ndestination = "a"\nmode = "0777x"\n', "octal"),
    ],
)
def test_template_errors_are_credential_errors(tmp_path: Path, extra: str, message: str) -> None:
    (tmp_path / "t.tmpl").write_text("a\nb\n${cja:base_url}\n")
    with pytest.raises(CredentialError) as e:
        parse(tmp_path, extra)
    assert str(e.value).startswith(f"{tmp_path}/c.toml: ")
    assert message.format(d=tmp_path) in str(e.value)


def test_render_safe_with_templates(tmp_path: Path) -> None:
    [cred] = parse(
        tmp_path,
        '[[template]]\ncontent = "$token ${aep:header:x-sandbox-name}"\ndestination = "a"\n'
        'mode = "0640"\n'
        '[[template]]\ncontent = "${generic:header:x-nope}"\ndestination = "b"\n',
    )
    cred = validate_products(cred, PRODUCTS)
    out, left_out = render_safe(cred, GRANT, PRODUCTS)
    assert out["a"] == f"{TOKEN} prod".encode()
    assert getattr(out["a"], "mode", None) == 0o640
    assert "b" not in out
    [why] = [u for u in left_out if u.files == ("b",)]
    assert why.reason == (
        f"c: template {tmp_path}/c.toml: template[1].content: line 1: 'generic:header:x-nope'"
        " has no value (the instance did not render, or has no such header or base URL)"
    )


# -- the sink --------------------------------------------------------------------------------


def test_sink_writes_lists_and_removes_template_files(tmp_path: Path) -> None:
    sink = FileSink(tmp_path, file_mode=0o640)
    d = tmp_path / "c"
    sink.write("c", {"token": b"t", "netrc": ModedBytes(b"n", 0o600), "env.json": b"{}"})
    assert (d / ".imsd-templates").read_text() == "env.json\nnetrc\n"
    assert stat.S_IMODE((d / "netrc").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "env.json").stat().st_mode) == 0o640
    # A mode wider than file_mode is narrowed by it.
    sink.write("c", {"token": b"t", "netrc": ModedBytes(b"n", 0o644)})
    assert stat.S_IMODE((d / "netrc").stat().st_mode) == 0o640
    assert not (d / "env.json").exists()  # no longer a template: removed
    assert (d / ".imsd-templates").read_text() == "netrc\n"
    (d / "foreign").write_text("x")
    sink.write("c", {"token": b"t"})
    assert sorted(os.listdir(d)) == ["foreign", "token"]
    # Removal and start-up clean-up know the listed files as ours, and only those.
    sink.write("c", {"token": b"t", "netrc": b"n"})
    (d / "foreign").unlink()
    assert sink.cleanup_orphans(keep=set()) == ["c"]
    assert not d.exists()
    sink.write("c", {"token": b"t", "netrc": b"n"})
    sink.remove("c")
    assert not d.exists()


def test_sink_refuses_a_path_or_dot_file(tmp_path: Path) -> None:
    sink = FileSink(tmp_path)
    for name in ("../x", "a/b", ".hidden"):
        with pytest.raises(OSError, match="not an output file name"):
            sink.write("c", {name: b"x"})


# -- end to end ------------------------------------------------------------------------------

NETRC = "machine platform.adobe.io\n  login $client_id\n  password $token\n"
POSTMAN = """{
  "name": "imsd $credential",
  "values": [
    {"key": "ACCESS_TOKEN", "value": "$token", "enabled": true},
    {"key": "API_KEY", "value": "${aep:header:x-api-key}", "enabled": true},
    {"key": "IMS_ORG", "value": "$org_id", "enabled": true},
    {"key": "SANDBOX_NAME", "value": "${aep:header:x-sandbox-name}", "enabled": true},
    {"key": "PLATFORM_GATEWAY", "value": "${aep:base_url}", "enabled": true},
    {"key": "EXPIRES_AT", "value": "$expires_at", "enabled": true}
  ]
}
"""


@pytest.mark.anyio
async def test_a_daemon_renders_templates_on_every_token(
    tmp_path: Path, fake: FakeIms, running: Any
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "netrc.tmpl").write_text(NETRC)
    (creds / "postman.tmpl").write_text(POSTMAN)
    write_cred(
        creds,
        "alpha",
        fake,
        extra='products = ["aep"]\n'
        '[[template]]\nsource = "netrc.tmpl"\ndestination = "netrc"\nmode = "0600"\n'
        '[[template]]\nsource = "postman.tmpl"\ndestination = "postman_environment.json"\n',
    )
    d = await running(min_refresh_interval=0, file_mode=0o640)
    out = d.settings.output_dir / "alpha"
    await wait_for(lambda: (out / "postman_environment.json").exists())

    def check() -> str:
        tok: str = (out / "token").read_text()
        assert (out / "netrc").read_text() == (
            f"machine platform.adobe.io\n  login client-a\n  password {tok}\n"
        )
        env = {
            v["key"]: v["value"]
            for v in json.loads((out / "postman_environment.json").read_text())["values"]
        }
        doc = json.loads((out / "token.json").read_text())
        assert env == {
            "ACCESS_TOKEN": tok,
            "API_KEY": "client-a",
            "IMS_ORG": ORG,
            "SANDBOX_NAME": "prod",
            "PLATFORM_GATEWAY": "https://platform.adobe.io",
            "EXPIRES_AT": doc["expires_at"],
        }
        assert stat.S_IMODE((out / "netrc").stat().st_mode) == 0o600
        assert stat.S_IMODE((out / "postman_environment.json").stat().st_mode) == 0o640
        return tok

    first = check()
    async with uds(d) as c:
        assert (await c.post("/v1/credentials/alpha/refresh")).status_code == 200
    assert check() != first
    # An edited template is re-read (as an edited secret file is) and its file rewritten.
    (creds / "netrc.tmpl").write_text("default password $token\n")
    await wait_for(lambda: (out / "netrc").read_text().startswith("default"))
    assert (out / "netrc").read_text() == f"default password {(out / 'token').read_text()}\n"
    # The credential goes: so do its template files (and the whole directory).
    (creds / "alpha.toml").unlink()
    await wait_for(lambda: not out.exists())
