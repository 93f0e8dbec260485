"""Rendering outputs: exact files for the built-in products, hostile products rejected."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from imsd import render
from imsd.model import MAX_TIMESTAMP, Credential, CredentialError, Grant, Secret, ValidatedOptions
from imsd.plugin import Product, TokenView
from imsd.registry import load_registry, validate_products
from imsd.render import (
    RenderError,
    Unrendered,
    Unresolved,
    document,
    product_env,
    product_headers,
    render_outputs,
    render_safe,
    rfc3339,
    token_view,
)

PRODUCTS = load_registry().products
ORG = "0123456789ABCDEF01234567@AdobeOrg"
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJ0eXBlIjoiYWNjZXNzX3Rva2VuIn0.c2ln-_"
GRANT = Grant(Secret(TOKEN), "bearer", 1_800_000_000.0, 1_800_086_400.0)


def cred(**kw: Any) -> Credential:
    base: dict[str, Any] = dict(
        name="c",
        path=Path("/c.toml"),
        auth="oauth_server_to_server",
        client_id="cid",
        client_secret=Secret("s"),
        org_id=ORG,
        scopes=("openid",),
    )
    return Credential(**{**base, **kw})


def test_generic_files_exactly() -> None:
    files = render_outputs(cred(), GRANT, PRODUCTS)
    assert files == {
        "token": TOKEN.encode(),
        "token.json": (
            "{\n"
            '  "credential": "c",\n'
            f'  "access_token": "{TOKEN}",\n'
            '  "token_type": "bearer",\n'
            '  "expires_at": "2027-01-16T08:00:00Z",\n'
            '  "issued_at": "2027-01-15T08:00:00Z",\n'
            '  "client_id": "cid",\n'
            f'  "org_id": "{ORG}",\n'
            '  "headers": {\n'
            '    "generic": {\n'
            f'      "Authorization": "Bearer {TOKEN}",\n'
            '      "x-api-key": "cid",\n'
            f'      "x-gw-ims-org-id": "{ORG}"\n'
            "    }\n"
            "  },\n"
            '  "instances": {\n'
            '    "generic": {\n'
            '      "type": "generic",\n'
            '      "base_url": null,\n'
            '      "base_urls": {},\n'
            '      "headers": {\n'
            f'        "Authorization": "Bearer {TOKEN}",\n'
            '        "x-api-key": "cid",\n'
            f'        "x-gw-ims-org-id": "{ORG}"\n'
            "      }\n"
            "    }\n"
            "  }\n"
            "}\n"
        ).encode(),
        "generic.headers": (
            f"Authorization: Bearer {TOKEN}\nx-api-key: cid\nx-gw-ims-org-id: {ORG}\n"
        ).encode(),
        "generic.env": (
            f"ADOBE_ACCESS_TOKEN={TOKEN}\nADOBE_API_KEY=cid\nADOBE_ORG_ID={ORG}\n"
        ).encode(),
    }
    assert json.loads(files["token.json"]) == document(cred(), GRANT, PRODUCTS)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=12,
)


@given(JSON)
def test_token_json_is_what_json_dumps_with_indent_writes(doc: Any) -> None:
    assert render._indented(doc) == json.dumps(doc, indent=2)


def test_multi_product_outputs_and_extra_headers_last() -> None:
    c = cred(
        products=("aep", "cja"),
        product_options={"aep": {"sandbox": "dev"}, "cja": {}},
        extra_headers={"X-Api-Key": "override", "x-team": "a"},
    )
    files = render_outputs(c, GRANT, PRODUCTS)
    assert sorted(files) == [
        "aep.env",
        "aep.headers",
        "cja.env",
        "cja.headers",
        "token",
        "token.json",
    ]
    assert files["cja.headers"].decode().splitlines() == [
        f"Authorization: Bearer {TOKEN}",
        f"x-gw-ims-org-id: {ORG}",
        "X-Api-Key: override",  # replaces x-api-key: header names have no case
        "x-team: a",
    ]
    assert b"x-sandbox-name: dev\n" in files["aep.headers"]
    assert b"ADOBE_SANDBOX_NAME=dev\n" in files["aep.env"]
    headers = json.loads(files["token.json"])["headers"]
    assert headers["aep"]["x-team"] == "a"
    assert headers["cja"] == product_headers(c, GRANT, PRODUCTS["cja"])


@pytest.mark.parametrize(
    ("outputs", "names"),
    [
        (("token",), ["token"]),
        (("json",), ["token.json"]),
        (("headers",), ["generic.headers"]),
        (("env",), ["generic.env"]),
        ((), []),
    ],
)
def test_outputs_subset(outputs: tuple[str, ...], names: list[str]) -> None:
    assert sorted(render_outputs(cred(outputs=outputs), GRANT, PRODUCTS)) == names


def test_unknown_product() -> None:
    with pytest.raises(RenderError, match=r"^c: unknown product 'nope'$"):
        render_outputs(cred(products=("generic", "nope")), GRANT, PRODUCTS)
    with pytest.raises(RenderError, match="unknown product"):
        document(cred(products=("nope",)), GRANT, PRODUCTS)


def test_token_view_validates_options() -> None:
    view = token_view(cred(products=("aep",)), GRANT, PRODUCTS["aep"])
    assert view.options == {"sandbox": "prod"}  # defaults filled in
    assert view.access_token == TOKEN
    assert (view.credential, view.client_id, view.org_id) == ("c", "cid", ORG)
    assert view.expires_at == GRANT.expires_at
    bad = cred(products=("aep",), product_options={"aep": {"sandbox": "a b"}})
    with pytest.raises(RenderError, match=r"c: product 'aep': option 'sandbox'"):
        render_outputs(bad, GRANT, PRODUCTS)


@pytest.mark.parametrize(
    ("ts", "text"),
    [
        (0, "1970-01-01T00:00:00Z"),
        (1.999, "1970-01-01T00:00:01Z"),  # truncated: never later than the real instant
        (1_800_000_000.0, "2027-01-15T08:00:00Z"),
        (951_782_400, "2000-02-29T00:00:00Z"),
        (1.9999996, "1970-01-01T00:00:02Z"),  # as datetime: rounded to the microsecond first
    ],
)
def test_rfc3339(ts: float, text: str) -> None:
    assert rfc3339(ts) == text


@given(st.floats(0, MAX_TIMESTAMP) | st.integers(0, MAX_TIMESTAMP))
def test_rfc3339_is_what_datetime_shows(ts: float) -> None:
    assert rfc3339(ts) == datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Hostile:
    name = "hostile"
    default_scopes: tuple[str, ...] = ()

    def __init__(self, headers: Any = None, env: Any = None, boom: str = "") -> None:
        self._h = {"x-a": "ok"} if headers is None else headers
        self._e = {} if env is None else env
        self._boom = boom

    def validate_options(self, options: Mapping[str, Any]) -> Mapping[str, Any]:
        if self._boom == "options":
            raise KeyError("whatever")
        return {}

    def headers(self, view: TokenView) -> Any:
        if self._boom == "headers":
            raise RuntimeError(f"leaking {view.access_token}")
        return self._h

    def env(self, view: TokenView) -> Any:
        if self._boom == "env":
            raise ValueError(f"leaking {view.access_token}")
        return self._e

    def base_url(self, options: Mapping[str, Any]) -> str | None:
        return None


@pytest.mark.parametrize(
    ("product", "reason"),
    [
        (Hostile({"x-a": "v\r\nInjected: 1"}), "'x-a' has an empty or multi-line value"),
        (Hostile({"x-a": "v\nb"}), "multi-line"),
        (Hostile({"x-a": "v\x00"}), "multi-line"),
        (Hostile({"x-a": "v\u2028b"}), "multi-line"),
        (Hostile({"x-a": ""}), "empty"),
        (Hostile({"x-a": "  "}), "empty"),
        (Hostile({"x-a": 1}), "multi-line"),
        (Hostile({"bad name": "v"}), "invalid header name"),
        (Hostile({"x-a\n": "v"}), "invalid header name"),
        (Hostile({"x-a:b": "v"}), "invalid header name"),
        (Hostile({"": "v"}), "invalid header name"),
        (Hostile({1: "v"}), "invalid header name"),
        (Hostile({"Transfer-Encoding": "chunked"}), "reserved"),
        (Hostile({"Host": "evil"}), "reserved"),
        (Hostile({"X-A": "1", "x-a": "2"}), "given twice"),
        (Hostile({TOKEN: "v\n"}), "header <redacted> has"),
        (Hostile(["not", "a", "mapping"]), "headers is not a mapping"),
        (Hostile(env={"KEY": "line\nNEXT=1"}), "'KEY' has a value"),
        (Hostile(env={"KEY": "line\rNEXT=1"}), "'KEY' has a value"),
        (Hostile(env={"KEY": '"quoted"'}), "'KEY' has a value"),
        (Hostile(env={"KEY": "'quoted'"}), "'KEY' has a value"),
        (Hostile(env={"KEY": "a\\nb"}), "'KEY' has a value"),
        (Hostile(env={"KEY": " lead"}), "'KEY' has a value"),
        (Hostile(env={"KEY": "trail\t"}), "'KEY' has a value"),
        (Hostile(env={"1KEY": "v"}), "invalid environment variable name"),
        (Hostile(env={"KEY\n": "v"}), "invalid environment variable name"),
        (Hostile(env={"K-Y": "v"}), "invalid environment variable name"),
        (Hostile(env={"KEY": None}), "'KEY' has a value"),
        (Hostile(boom="headers"), "failed to render headers (RuntimeError)"),
        (Hostile(boom="env"), "failed to render env (ValueError)"),
        (Hostile(boom="options"), "validate_options failed (KeyError)"),
    ],
)
def test_hostile_products_rejected_without_leaking(product: Product, reason: str) -> None:
    c = cred(products=("hostile",))
    with pytest.raises(RenderError) as err:
        render_outputs(c, GRANT, {"hostile": product})
    message = str(err.value)
    assert message.startswith("c: product 'hostile': ")
    assert reason in message
    assert TOKEN not in message
    assert TOKEN not in repr(err.value)
    assert err.value.__cause__ is None  # the plugin's exception (and its text) is not chained


class Counting(Hostile):
    """Counts validate_options calls; renders the options it normalized."""

    def __init__(self) -> None:
        super().__init__()
        self.validations = 0

    def validate_options(self, options: Mapping[str, Any]) -> Mapping[str, Any]:
        self.validations += 1
        return {"n": str(options.get("n", 0)), "default": "filled"}

    def headers(self, view: TokenView) -> Any:
        return {"x-n": view.options["n"], "x-default": view.options["default"]}

    def env(self, view: TokenView) -> Any:
        return {"N": view.options["n"]}


def test_options_are_validated_once_per_credential_version() -> None:
    product = Counting()
    products: dict[str, Product] = {"hostile": product}
    c = validate_products(
        cred(products=("hostile",), product_options={"hostile": {"n": 1}}), products
    )
    assert product.validations == 1
    for _ in range(3):
        files, left_out = render_safe(c, GRANT, products)
        assert not left_out
        assert document(c, GRANT, products)["headers"]["hostile"]["x-n"] == "1"
        assert product_env(c, GRANT, product) == {"N": "1"}
    assert files["hostile.headers"] == b"x-n: 1\nx-default: filled\n"
    assert validate_products(c, products) == c  # already validated: kept as it is
    assert product.validations == 1
    # A copy given other options is a new version: validated again where it is used.
    edited = replace(c, product_options={"hostile": {"n": 2}})
    assert render_safe(edited, GRANT, products)[0]["hostile.env"] == b"N=2\n"
    assert product.validations > 1


def test_a_plugin_bug_in_validate_options_is_a_credential_error() -> None:
    with pytest.raises(
        CredentialError, match=r"product\.hostile: validate_options failed \(KeyError\)"
    ):
        validate_products(cred(products=("hostile",)), {"hostile": Hostile(boom="options")})


def test_env_values_that_read_the_same_everywhere_are_kept_verbatim() -> None:
    env = {"A": "x=y", "B": "it's", "C": 'say "hi"', "D": "a b\tc", "E": "", "F": "#not-a-comment"}
    c = cred(products=("hostile",))
    assert product_env(c, GRANT, Hostile(env=env)) == env
    files = render_outputs(c, GRANT, {"hostile": Hostile(env=env)})
    assert files["hostile.env"] == (b'A=x=y\nB=it\'s\nC=say "hi"\nD=a b\tc\nE=\nF=#not-a-comment\n')


@pytest.mark.parametrize(
    "extra",
    [{"bad name": "v"}, {"x-b": "v\r\nX-Evil: 1"}, {"Connection": "close"}],
)
def test_invalid_extra_headers(extra: dict[str, str]) -> None:
    with pytest.raises(RenderError, match=r"^c: extra_headers: "):
        render_outputs(cred(extra_headers=extra), GRANT, PRODUCTS)


@pytest.mark.parametrize("token", ["abc\\def.ghi", '"abc.def', "'abc.def", "abc.def\\"])
def test_a_token_unsafe_in_env_files_still_writes_the_safe_files(token: str) -> None:
    """A backslash or a leading quote reads differently in systemd and docker env files, so
    the env file is left out and reported; ``token``, ``token.json`` and the headers file,
    which carry it verbatim (or JSON-escaped), are still rendered. (IMS answers with such a
    token are refused earlier, in flows; this holds for any other source.)"""
    grant = Grant(Secret(token), "bearer", 1_800_000_000.0, 1_800_086_400.0)
    files, left_out = render_safe(cred(products=("generic", "cja")), grant, PRODUCTS)
    assert sorted(files) == ["cja.headers", "generic.headers", "token", "token.json"]
    assert files["token"] == token.encode()
    assert json.loads(files["token.json"])["access_token"] == token
    assert f"Authorization: Bearer {token}\n".encode() in files["generic.headers"]
    assert [u.files for u in left_out] == [("generic.env",), ("cja.env",)]
    for u in left_out:
        assert "'ADOBE_ACCESS_TOKEN' has a value" in u.reason
        assert token not in str(u)
    assert str(left_out[0]).startswith("generic.env not written (c: product 'generic': ")


@pytest.mark.parametrize(
    ("value", "refused"),
    [
        ("a b", False),
        ("a'b\"c", False),
        ("", False),
        (" a", True),
        ("a\t", True),
        ("\u3000a", True),  # Unicode whitespace at either end, as str.isspace says
        ("a\xa0", True),
        ('"a', True),
        ("'a", True),
        ("a\\b", True),
    ],
)
def test_env_values_ambiguous_in_systemd_or_docker_are_refused(value: str, refused: bool) -> None:
    c = cred(products=("hostile",))
    files, left_out = render_safe(c, GRANT, {"hostile": Hostile(env={"KEY": value})})
    assert ("hostile.env" not in files) == refused
    assert [u.files for u in left_out] == ([("hostile.env",)] if refused else [])


def test_one_unsafe_product_holds_back_only_its_own_files() -> None:
    c = cred(products=("hostile", "generic"))
    bad = Hostile({"x-a": "v\nb"}, env={"KEY": "a\\b"})
    files, left_out = render_safe(c, GRANT, {"hostile": bad, **PRODUCTS})
    assert sorted(files) == ["generic.env", "generic.headers", "token", "token.json"]
    assert list(json.loads(files["token.json"])["headers"]) == ["generic"]
    assert [u.files for u in left_out] == [
        ("hostile.headers", "headers.hostile in token.json"),
        ("hostile.env",),
    ]
    # an unknown product (a plugin gone after a reload) is left out the same way
    files, left_out = render_safe(cred(products=("generic", "nope")), GRANT, PRODUCTS)
    assert sorted(files) == ["generic.env", "generic.headers", "token", "token.json"]
    assert left_out == [
        Unrendered(
            ("nope.headers", "nope.env", "headers.nope in token.json"),
            "c: unknown product 'nope'",
        )
    ]
    _, left_out = render_safe(cred(products=("nope",), outputs=("json",)), GRANT, PRODUCTS)
    assert str(left_out[0]) == "headers.nope in token.json not written (c: unknown product 'nope')"
    assert render_safe(cred(products=("nope",), outputs=("token",)), GRANT, PRODUCTS) == (
        {"token": TOKEN.encode()},
        [],
    )


# -- properties ------------------------------------------------------------------------------


def systemd_env_value(line: str) -> str:
    """The value systemd's EnvironmentFile= parser (env-file.c) reads from one KEY=... line."""
    raw = line.split("=", 1)[1]
    value, state, trailing = "", "pre", 0
    for c in raw:
        if state == "pre":
            if c in " \t":
                continue
            if c in "'\"":
                state = c
            elif c == "\\":
                state = "esc"
            else:
                state, value = "value", c
        elif state == "value":
            if c == "\\":
                state, trailing = "esc", 0
            else:
                trailing = trailing + 1 if c in " \t" else 0
                value += c
        elif state == "esc":
            state, value = "value", value + c
        elif c == state:  # closing quote
            state = "pre"
        else:
            value += c
    return value[: len(value) - trailing] if trailing else value


def docker_env_value(line: str) -> str:
    """docker --env-file: the line with leading whitespace trimmed, value taken literally."""
    return line.lstrip().split("=", 1)[1]


@given(st.text(max_size=30))
def test_env_values_accepted_read_identically_in_systemd_and_docker(value: str) -> None:
    c = cred(products=("hostile",))
    try:
        files = render_outputs(c, GRANT, {"hostile": Hostile(env={"KEY": value})})
    except RenderError:
        return
    lines = files["hostile.env"].decode().split("\n")
    assert lines[1:] == [""]  # exactly one line
    assert systemd_env_value(lines[0]) == value
    assert docker_env_value(lines[0]) == value


@given(st.text(max_size=20), st.text(max_size=20))
def test_no_header_line_injection(name: str, value: str) -> None:
    c = cred(products=("hostile",))
    try:
        files = render_outputs(c, GRANT, {"hostile": Hostile({name: value})})
    except RenderError:
        return
    lines = files["hostile.headers"].decode().splitlines()
    assert lines == [f"{name}: {value}"]
    assert files["hostile.headers"].endswith(b"\n")


TOKENS = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=12)


@given(
    TOKENS,
    st.dictionaries(
        st.text(min_size=1, max_size=12),
        st.sampled_from(["{t}", "Bearer {t}", "{t}\n", "x\r\n{t}", "", "{t}\\", " {t}"]),
        max_size=4,
    ),
    st.booleans(),
)
def test_token_never_escapes_into_errors_or_file_names(
    token: str, template: dict[str, str], as_env: bool
) -> None:
    values = {k: v.format(t=token) for k, v in template.items()}
    product = Hostile(env=values) if as_env else Hostile(headers=values)
    grant = Grant(Secret(token), "bearer", 0.0, 86_400.0)
    message = ""
    files: dict[str, bytes] = {}
    try:
        files = render_outputs(cred(products=("hostile",)), grant, {"hostile": product})
    except RenderError as e:
        message = str(e)
    assert token not in message
    if message:
        return
    assert set(files) == {"token", "token.json", "hostile.headers", "hostile.env"}
    assert files["token"] == token.encode()
    assert json.loads(files["token.json"])["access_token"] == token


class Rooted(Hostile):
    """A product whose base URLs are whatever the test says."""

    def __init__(self, base: Any = None, named: Any = None) -> None:
        super().__init__()
        self._base, self._named = base, named

    def base_url(self, options: Mapping[str, Any]) -> Any:
        return self._base

    def base_urls(self, options: Mapping[str, Any]) -> Any:
        if self._named == "boom":
            raise RuntimeError(f"leaking {TOKEN}")
        return self._named or {}


@pytest.mark.parametrize(
    ("product", "reason"),
    [
        (Rooted("http://api.example.com"), "base_url is not an https URL"),
        (Rooted("https://api.example.com/a b"), "base_url is not an https URL"),
        (Rooted("https://api.example.com/\nX: y"), "base_url is not an https URL"),
        (Rooted(b"https://api.example.com"), "base_url is not an https URL"),
        (Rooted(None, {"Bad-Name": "https://a.example"}), "invalid name"),
        (Rooted(None, {"x": "ftp://a.example"}), "base_urls['x'] is not an https URL"),
        (Rooted(None, ["https://a.example"]), "base_urls is not a mapping"),
        (Rooted(None, "boom"), "failed to compute its base URL (RuntimeError)"),
    ],
)
def test_base_urls_are_validated(product: Product, reason: str) -> None:
    c = cred(products=("hostile",))
    with pytest.raises(RenderError) as err:
        product_env(c, GRANT, product)
    assert reason in str(err.value)
    assert TOKEN not in str(err.value)
    # The token and token.json are still written; only the instance is left out.
    files, left_out = render_safe(c, GRANT, {"hostile": product})
    assert json.loads(files["token.json"])["instances"] == {}
    assert {f for u in left_out for f in u.files} >= {"hostile.env", "hostile.headers"}


def test_loopback_and_named_base_urls_are_published() -> None:
    c = cred(products=("hostile",))
    product = Rooted("http://127.0.0.1:8080/api", {"journey": "https://j.example/x"})
    env = product_env(c, GRANT, product)
    assert env["ADOBE_BASE_URL"] == "http://127.0.0.1:8080/api"
    assert env["ADOBE_JOURNEY_BASE_URL"] == "https://j.example/x"
    entry = document(c, GRANT, {"hostile": product})["instances"]["hostile"]
    assert entry == {
        "type": "hostile",
        "base_url": "http://127.0.0.1:8080/api",
        "base_urls": {"journey": "https://j.example/x"},
        "headers": {"x-a": "ok"},
    }


def test_unresolved_options_leave_the_instance_out_with_the_reason() -> None:
    c = validate_products(cred(products=("aep", "cja")), PRODUCTS)
    options = dict(c.product_options)
    options["aep"] = Unresolved(options["aep"], "discovery said no")
    c = replace(c, product_options=ValidatedOptions(options))
    files, left_out = render_safe(c, GRANT, PRODUCTS)
    assert "aep.headers" not in files
    assert "aep.env" not in files
    assert "cja.headers" in files
    assert sorted(json.loads(files["token.json"])["instances"]) == ["cja"]
    assert [str(u.reason) for u in left_out] == ["c: product 'aep': discovery said no"] * 2
