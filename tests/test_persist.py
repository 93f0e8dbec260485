"""Tokens survive a restart: the state file, pure and through the daemon."""

from __future__ import annotations

import functools
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from imsd import logs
from imsd.daemon import Daemon, run_once
from imsd.fakeims.server import FakeIms
from imsd.model import Grant, Secret
from imsd.persist import StateError, StateFile, Stored, decode, encode
from imsd.registry import load_registry
from imsd.sinks import SinkError

from tests.test_daemon import SECRET, SECRET2, make_settings, write_cred

ORG = "0123456789ABCDEF01234567@AdobeOrg"


def mode(path: Path) -> int:
    return path.lstat().st_mode & 0o777


@pytest.fixture
def fake() -> Iterator[FakeIms]:
    with FakeIms.in_thread() as f:
        f.state.add_client(
            "client-a",
            secrets=[SECRET, SECRET2],
            scopes=["openid", "AdobeID", "read_organizations"],
            org_id=ORG,
        )
        yield f


def test_round_trip_and_rejections() -> None:
    g = Grant(Secret("tok"), "bearer", 100.0, 200.0)
    entries = {"a": Stored("id-a", g, Secret("rt")), "b": Stored("id-b")}
    assert decode(encode(entries)) == entries
    for bad in (
        b"nope",
        b"[]",
        b'{"kind": "other"}',
        b'{"kind": "imsd-state", "version": 99, "credentials": {}}',
    ):
        with pytest.raises(StateError):
            decode(bad)
    doc = json.loads(encode(entries))
    doc["credentials"]["a"]["grant"]["expires_at"] = "soon"
    assert set(decode(json.dumps(doc).encode())) == {"b"}  # the bad entry alone is dropped


@pytest.mark.parametrize(
    ("token", "token_type"),
    [("a\\b", "bearer"), ('"ab', "bearer"), ("a b", "bearer"), ("ab", "mac")],
)
def test_a_state_token_imsd_would_refuse_from_ims_is_dropped(token: str, token_type: str) -> None:
    """The state file is held to what an IMS answer is: a token no header or env file can
    carry as is (written by an older imsd, or planted) is never restored and published."""
    good = Grant(Secret("tok"), "bearer", 100.0, 200.0)
    bad = Grant(Secret(token), token_type, 100.0, 200.0)
    data = encode({"a": Stored("id-a", bad), "b": Stored("id-b", good)})
    assert set(decode(data)) == {"b"}


@pytest.mark.parametrize(
    ("literal", "whole_file"),
    [("NaN", True), ("Infinity", True), ("-Infinity", True), ("1e400", False), ("9" * 400, False)],
)
def test_non_finite_times_are_rejected(literal: str, whole_file: bool) -> None:
    """NaN/Infinity are not JSON: the file is corrupt. A number that parses but is infinite
    or too large drops its entry. Either way nothing non-finite reaches a Grant."""
    g = Grant(Secret("tok"), "bearer", 100.0, 200.0)
    doc = json.loads(encode({"a": Stored("id-a", g), "b": Stored("id-b", g)}))
    doc["credentials"]["a"]["grant"]["expires_at"] = "@"
    data = json.dumps(doc).replace('"@"', literal).encode()
    if whole_file:
        with pytest.raises(StateError, match="not JSON"):
            decode(data)
    else:
        assert set(decode(data)) == {"b"}


def test_state_file_modes(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "state")
    state.save({"a": Stored("x", Grant(Secret("tok"), "bearer", 1.0, 2.0))})
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    assert state.path.stat().st_mode & 0o777 == 0o600
    assert set(state.load()) == {"a"}


def test_state_dir_is_never_chmod_ed_through_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "shared"
    target.mkdir()
    os.chmod(target, 0o500)
    (tmp_path / "state").symlink_to(target)
    state = StateFile(tmp_path / "state")
    with pytest.raises(SinkError, match="not a directory \\(a symlink\\?\\); refusing"):
        state.save({"a": Stored("x", Grant(Secret("tok"), "bearer", 1.0, 2.0))})
    assert mode(target) == 0o500  # was chmod-ed 0700 through the link
    assert list(target.iterdir()) == []


def test_state_dir_and_parents_are_0700_under_umask_000(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        state = StateFile(tmp_path / "var" / "lib" / "imsd")
        state.save({"a": Stored("x", Grant(Secret("tok"), "bearer", 1.0, 2.0))})
    finally:
        os.umask(old)
    for d in (tmp_path / "var", tmp_path / "var" / "lib", tmp_path / "var" / "lib" / "imsd"):
        assert mode(d) == 0o700  # the parents were 0777
    assert mode(state.path) == 0o600


def test_a_state_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root")
    planted = tmp_path / "state"
    planted.mkdir()
    os.chmod(planted, 0o500)
    os.chown(planted, 65534, 65534)
    with pytest.raises(SinkError, match="owned by uid 65534, not by imsd or root; refusing"):
        StateFile(planted).save({"a": Stored("x", Grant(Secret("tok"), "bearer", 1.0, 2.0))})
    assert list(planted.iterdir()) == []
    assert (mode(planted), planted.stat().st_uid) == (0o500, 65534)


@pytest.mark.anyio
async def test_restart_reuses_tokens_without_ims(tmp_path: Path, fake: FakeIms) -> None:
    s = make_settings(tmp_path)
    write_cred(s.credentials_dir, "alpha", fake)
    assert await run_once(s, load_registry(), give_up_after=10) == 0
    token = (s.output_dir / "alpha" / "token").read_text()
    (s.output_dir / "alpha" / "token").unlink()
    assert fake.state.request_count() == 1
    # A restart: same credential, valid token in the state dir → no IMS request.
    async with anyio.create_task_group() as tg:
        d = Daemon(s, load_registry())
        await tg.start(functools.partial(d.run, handle_signals=False))
        assert (s.output_dir / "alpha" / "token").read_text() == token
        tg.cancel_scope.cancel()
    assert fake.state.request_count() == 1
    # A changed secret invalidates the stored token.
    write_cred(s.credentials_dir, "alpha", fake, secret=SECRET2)
    assert await run_once(s, load_registry(), give_up_after=10) == 0
    assert fake.state.request_count() == 2
    assert (s.output_dir / "alpha" / "token").read_text() != token


@pytest.mark.anyio
async def test_corrupt_state_is_reported_not_fatal(tmp_path: Path, fake: FakeIms) -> None:
    stream = io.StringIO()
    logs.configure("info", "json", stream)
    s = make_settings(tmp_path)
    write_cred(s.credentials_dir, "alpha", fake)
    os.makedirs(s.state_dir, exist_ok=True)
    (s.state_dir / "tokens.json").write_text("{garbage")
    assert await run_once(s, load_registry(), give_up_after=10) == 0
    assert "state.ignored" in stream.getvalue()
    assert decode((s.state_dir / "tokens.json").read_bytes())  # rewritten cleanly
    logs.configure("warning", "json")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("literal", "event"), [("NaN", "state.ignored"), ("1e400", "state.entry_ignored")]
)
async def test_state_with_non_finite_times_is_ignored_not_fatal(
    tmp_path: Path, fake: FakeIms, literal: str, event: str
) -> None:
    """A stored token whose times are NaN/inf under the right identity used to reach
    ``rfc3339`` at start and crash it; it is logged and ignored, and a token fetched anew."""
    s = make_settings(tmp_path)
    write_cred(s.credentials_dir, "alpha", fake)
    assert await run_once(s, load_registry(), give_up_after=10) == 0
    path = s.state_dir / "tokens.json"
    doc = json.loads(path.read_bytes())
    doc["credentials"]["alpha"]["grant"]["expires_at"] = "@"
    path.write_text(json.dumps(doc).replace('"@"', literal))
    stream = io.StringIO()
    logs.configure("info", "json", stream)
    try:
        assert await run_once(s, load_registry(), give_up_after=10) == 0
    finally:
        logs.configure("warning", "json")
    assert event in stream.getvalue()
    assert fake.state.request_count() == 2  # not restored: fetched again
    assert decode(path.read_bytes())["alpha"].grant is not None  # rewritten cleanly
