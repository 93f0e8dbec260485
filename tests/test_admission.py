"""Which requests a proxy listener signs (imsd.admission, issue 23 High 2 and Low 13): table
tests of the pure rule. The attacks against a running proxy are in tests/test_proxy.py."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from imsd.admission import admit, host_name
from imsd.config import ProxySpec
from pydantic import ValidationError

OK = None


@pytest.mark.parametrize(
    ("method", "headers", "want"),
    [
        # Programs: no Origin, no Sec-Fetch-*, Host a loopback name or address.
        ("GET", [("Host", "127.0.0.1:8080")], OK),
        ("GET", [("Host", "localhost:8080")], OK),
        ("GET", [("Host", "LOCALHOST.:8080")], OK),
        ("GET", [("Host", "[::1]:8080")], OK),
        ("GET", [("Host", "10.1.2.3")], OK),  # an address cannot be rebound
        ("POST", [], OK),  # HTTP/1.0 without Host: no browser sends that
        ("GET", [("Host", "imsd-proxy:8080")], "host_not_allowed"),
        # DNS rebinding: the page's name, now pointing at 127.0.0.1.
        ("GET", [("Host", "attacker.example:8080")], "host_not_allowed"),
        ("GET", [("Host", "localhost.attacker.example")], "host_not_allowed"),
        ("GET", [("Host", "127.0.0.1.nip.io:8080")], "host_not_allowed"),
        ("GET", [("Host", "127.0.0.1:8080:9")], "bad_host"),
        ("GET", [("Host", "[::1")], "bad_host"),
        ("GET", [("Host", "127.0.0.1"), ("Host", "attacker.example")], "bad_host"),
        # Web pages: a cross-site simple POST (no preflight), a same-site other port.
        (
            "POST",
            [("Host", "127.0.0.1:8080"), ("Origin", "https://evil.example")],
            "origin_not_allowed",
        ),
        ("POST", [("Host", "127.0.0.1:8080"), ("Origin", "null")], "origin_not_allowed"),
        (
            "GET",
            [("Host", "127.0.0.1:8080"), ("Sec-Fetch-Site", "cross-site")],
            "origin_not_allowed",
        ),
        (
            "GET",
            [("Host", "127.0.0.1:8080"), ("Sec-Fetch-Site", "same-site")],
            "origin_not_allowed",
        ),
        ("GET", [("Host", "127.0.0.1:8080"), ("Sec-Fetch-Site", "same-origin")], OK),
        ("GET", [("Host", "127.0.0.1:8080"), ("Sec-Fetch-Site", "none")], OK),  # typed URL
        # Never forwarded: an echo of the injected token, a tunnel.
        ("TRACE", [("Host", "127.0.0.1:8080")], "method_not_allowed"),
        ("track", [("Host", "127.0.0.1:8080")], "method_not_allowed"),
        ("CONNECT", [("Host", "127.0.0.1:8080")], "method_not_allowed"),
    ],
)
def test_admission_table(method: str, headers: list[tuple[str, str]], want: str | None) -> None:
    got = admit(method, headers, tcp=True)
    assert (got.code if got else None) == want


def test_listed_hosts_and_origins_are_admitted() -> None:
    spec = ProxySpec(
        listen="127.0.0.1:8080",
        credential="aep",
        product="aep",
        allowed_hosts=("IMSD-Proxy.",),
        allowed_origins=("HTTP://localhost:3000/",),
    )
    rule = {"allowed_hosts": spec.allowed_hosts, "allowed_origins": spec.allowed_origins}
    assert admit("GET", [("Host", "imsd-proxy:8080")], tcp=True, **rule) is None
    page = [("Host", "127.0.0.1:8080"), ("Sec-Fetch-Site", "same-site")]
    assert admit("POST", [*page, ("Origin", "http://localhost:3000")], tcp=True, **rule) is None
    got = admit("POST", [*page, ("Origin", "http://localhost:3001")], tcp=True, **rule)
    assert got is not None
    assert got.code == "origin_not_allowed"
    assert admit("POST", page, tcp=True, **rule) is not None  # a site without its Origin


def test_unix_listeners_check_origins_not_hosts() -> None:
    assert admit("GET", [("Host", "aep")], tcp=False) is None
    got = admit("GET", [("Host", "aep"), ("Origin", "https://evil.example")], tcp=False)
    assert got is not None
    assert got.code == "origin_not_allowed"
    got = admit("TRACE", [("Host", "aep")], tcp=False)
    assert got is not None
    assert got.status == 405
    assert got.allow


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("allowed_origins", "*"),
        ("allowed_origins", "null"),
        ("allowed_origins", "localhost:3000"),
        ("allowed_origins", "http://localhost:3000/app"),
        ("allowed_origins", "file://"),
        ("allowed_hosts", "*"),
        ("allowed_hosts", "imsd:8080"),
        ("allowed_hosts", "http://imsd"),
        ("allowed_hosts", ""),
    ],
)
def test_bad_allow_lists_are_config_errors(field: str, value: str) -> None:
    with pytest.raises(ValidationError, match="expected"):
        ProxySpec(listen="127.0.0.1:8080", credential="aep", product="aep", **{field: (value,)})


@given(st.text(max_size=40))
def test_host_name_never_raises_and_names_no_port(value: str) -> None:
    got = host_name(value)
    assert got is None or (got and not got.endswith("."))
    if got is not None and not got.startswith("["):
        assert ":" not in got


def test_log_throttle_says_once_per_interval_and_counts_the_rest() -> None:
    from imsd.logs import LogThrottle

    t = LogThrottle(60.0, limit=3)
    assert t.due("a", 0.0) == 0
    assert [t.due("a", x) for x in (1.0, 59.9)] == [None, None]
    assert t.due("b", 2.0) == 0  # keys are apart
    assert t.due("a", 60.0) == 2  # the two held back
    for key in "cde":  # more keys than the limit: forgotten, never grown without bound
        t.due(key, 61.0)
    assert len(t._seen) <= 3
