from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
import structlog
from imsd import logs
from imsd.model import Secret

TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJpZCI6IjEyMyJ9.c2lnbmF0dXJl"


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    yield out
    logs.configure("warning", "json")


@pytest.mark.parametrize("fmt", logs.FORMATS)
def test_secrets_redacted_in_every_format(stream: io.StringIO, fmt: str) -> None:
    logs.configure("debug", fmt, stream)
    log = structlog.get_logger("imsd.test")
    log.info(
        "x",
        client_secret="p8e-abcdefghijklmnop",
        header=f"Bearer {TOKEN}",
        url="https://h/?access_token=abc123&x=1",
        secret=Secret("hunter2-value"),
    )
    try:
        raise ValueError(f"boom {TOKEN}")
    except ValueError:
        log.exception("failed")
    text = stream.getvalue()
    for leak in ("p8e-abcdefghijklmnop", TOKEN, "abc123", "hunter2-value"):
        assert leak not in text
    assert "boom" in text


def test_json_lines_parse(stream: io.StringIO) -> None:
    logs.configure("info", "json", stream)
    structlog.get_logger("imsd.test").info("token.refreshed", credential="a")
    structlog.get_logger("imsd.test").debug("hidden")
    [line] = stream.getvalue().splitlines()
    event = json.loads(line)
    assert event["event"] == "token.refreshed"
    assert event["level"] == "info"


def test_journald_priority_prefix(stream: io.StringIO) -> None:
    logs.configure("info", "journald", stream)
    structlog.get_logger("imsd.test").error("sink.write_failed", credential="a")
    assert stream.getvalue().startswith("<3>sink.write_failed credential=a")


def test_unknown_format_rejected() -> None:
    with pytest.raises(ValueError, match="unknown log format"):
        logs.configure("info", "xml", io.StringIO())
