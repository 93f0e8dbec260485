"""``imsd.client`` as an application uses it: against a running daemon's files and socket,
against hand-written token documents, with no daemon at all, and in a fresh interpreter."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
from imsd import client
from imsd.client import ImsdUnavailable, headers, request, token, token_document
from imsd.fakeims.server import FakeIms

from tests import test_attacks
from tests.support import ORG, uds, write_cred
from tests.test_attacks import User

pytestmark = pytest.mark.anyio

# A throwaway second user, and a directory it can traverse (tests/test_attacks.py's).
make_user, world = test_attacks.make_user, test_attacks.world

T = TypeVar("T")


async def blocking(fn: Callable[[], T]) -> T:
    """The client blocks; the daemon shares this event loop, so call it from a thread."""
    return await anyio.to_thread.run_sync(fn)


async def raises(fn: Callable[[], object]) -> ImsdUnavailable:
    with pytest.raises(ImsdUnavailable) as e:
        await blocking(fn)
    return e.value


def write_doc(output_dir: Path, name: str, doc: object) -> Path:
    path = output_dir / name / "token.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def doc_expiring_in(seconds: float, token: str = "tok-1") -> dict[str, Any]:
    when = datetime.now(UTC) + timedelta(seconds=seconds)
    return {
        "access_token": token,
        "expires_at": when.isoformat().replace("+00:00", "Z"),
        "headers": {"generic": {"Authorization": f"Bearer {token}", "x-api-key": "k"}},
    }


# -- against a running daemon ---------------------------------------------------------------


async def test_files_and_socket_agree(tmp_path: Path, fake: FakeIms, running: Any) -> None:
    write_cred(tmp_path / "creds", "alpha", fake, extra='products = ["aep", "generic"]\n')
    d = await running(min_refresh_interval=0)
    out, sock = d.settings.output_dir, d.settings.socket
    for _ in range(2):  # before and after a forced refresh
        on_disk = (out / "alpha" / "token").read_text()
        from_files = token_document("alpha", output_dir=out)
        from_socket = await blocking(lambda: token_document("alpha", socket=sock))
        assert from_files == from_socket
        assert from_files["access_token"] == on_disk
        assert token("alpha", output_dir=out) == on_disk
        assert await blocking(lambda: token("alpha", socket=sock)) == on_disk
        expected = {
            "Authorization": f"Bearer {on_disk}",
            "x-api-key": "client-a",
            "x-gw-ims-org-id": ORG,
            "x-sandbox-name": "prod",
        }
        assert headers("alpha", output_dir=out) == expected  # the first product: aep
        assert headers("alpha", product="aep", output_dir=out) == expected
        assert await blocking(lambda: headers("alpha", socket=sock)) == expected
        generic = headers("alpha", product="generic", output_dir=out)
        assert generic == {k: v for k, v in expected.items() if k != "x-sandbox-name"}
        async with uds(d) as c:
            r = await c.post("/v1/credentials/alpha/refresh")
        assert r.status_code == 200
        assert r.json()["access_token"] != on_disk


async def test_unknown_product(tmp_path: Path, fake: FakeIms, running: Any) -> None:
    write_cred(tmp_path / "creds", "alpha", fake, extra='products = ["aep"]\n')
    d = await running()
    for where in ({"output_dir": d.settings.output_dir}, {"socket": d.settings.socket}):
        e = await raises(lambda w=where: headers("alpha", product="cja", **w))  # type: ignore[misc]
        assert str(e) == "alpha has no product 'cja' (it has: aep)"


async def test_socket_errors_carry_status_and_code(
    tmp_path: Path, fake: FakeIms, running: Any
) -> None:
    write_cred(tmp_path / "creds", "alpha", fake)
    write_cred(tmp_path / "creds", "bad", fake, secret="p8e-wrong-00000000000000000")
    d = await running()
    sock = d.settings.socket
    e = await raises(lambda: token("nope", socket=sock))
    assert (e.status, e.code) == (404, "unknown_credential")
    assert "nope" in str(e)
    e = await raises(lambda: token("bad", socket=sock))
    assert (e.status, e.code) == (503, "expired")
    assert "invalid_client" in str(e)
    e = await raises(lambda: request("DELETE", "/v1/credentials/alpha/token", socket=sock))
    assert e.status == 405
    # From the files, the failing credential simply has no token.
    e = await raises(lambda: token("bad", output_dir=d.settings.output_dir))
    assert "bad/token.json does not exist (is imsd running?)" in str(e)


async def test_refused_peer(tmp_path: Path, fake: FakeIms, running: Any) -> None:
    write_cred(tmp_path / "creds", "alpha", fake)
    d = await running(allowed_uids=[65534], allowed_gids=[])
    e = await raises(lambda: token("alpha", socket=d.settings.socket))
    assert (e.status, e.code) == (403, "forbidden")


async def test_environment_defaults_in_a_fresh_interpreter(
    tmp_path: Path, fake: FakeIms, running: Any
) -> None:
    """IMSD_OUTPUT_DIR and IMSD_SOCKET are the defaults; using the client (files and socket)
    loads no daemon module."""
    write_cred(tmp_path / "creds", "alpha", fake)
    d = await running()
    script = textwrap.dedent(
        """\
        import json, sys
        from imsd.client import request, token
        print(json.dumps({
            "files": token("alpha"),
            "socket": request("GET", "/v1/credentials/alpha/token")["access_token"],
            "modules": sorted(sys.modules),
        }))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMSD_")}
    env |= {"IMSD_OUTPUT_DIR": str(d.settings.output_dir), "IMSD_SOCKET": str(d.settings.socket)}
    r = await anyio.run_process([sys.executable, "-c", script], env=env, check=False)
    assert r.returncode == 0, r.stderr.decode()
    got = json.loads(r.stdout)
    on_disk = (d.settings.output_dir / "alpha" / "token").read_text()
    assert got["files"] == got["socket"] == on_disk
    assert daemon_modules(got["modules"]) == []


# -- hand-written documents and no daemon ---------------------------------------------------


@pytest.mark.parametrize(
    ("expires_in", "kwargs", "usable"),
    [
        (3600, {}, True),
        (-3600, {}, False),
        (30, {}, False),  # alive, but within the default 60 s
        (30, {"min_validity": 10}, True),
        (30, {"min_validity": 30}, False),
        (-1, {"min_validity": 0}, False),  # dead is dead, whatever the caller asks
    ],
)
def test_expiry_is_checked(
    tmp_path: Path, expires_in: float, kwargs: dict[str, Any], usable: bool
) -> None:
    write_doc(tmp_path, "alpha", doc_expiring_in(expires_in))
    calls: list[Callable[[], object]] = [
        lambda: token_document("alpha", output_dir=tmp_path, **kwargs),
        lambda: token("alpha", output_dir=tmp_path, **kwargs),
        lambda: headers("alpha", output_dir=tmp_path, **kwargs),
    ]
    for call in calls:
        if usable:
            assert call()
            continue
        with pytest.raises(ImsdUnavailable) as e:
            call()
        assert e.value.code == "expired"
        assert re.fullmatch(r"alpha: token expires in -?\d+s \(wanted > [\d.]+s\)", str(e.value))
        assert "tok-1" not in str(e.value)
    if usable:
        assert token("alpha", output_dir=tmp_path, **kwargs) == "tok-1"
        assert headers("alpha", output_dir=tmp_path, **kwargs)["x-api-key"] == "k"


@pytest.mark.parametrize(
    "expires_at",
    ["2999-01-01T00:00:00Z", "2999-01-01T00:00:00+00:00", "2999-01-01T02:00:00.123+02:00"],
)
def test_expires_at_formats(tmp_path: Path, expires_at: str) -> None:
    write_doc(tmp_path, "alpha", {**doc_expiring_in(0), "expires_at": expires_at})
    assert token("alpha", output_dir=tmp_path) == "tok-1"


NO_EXPIRY = "token document has no valid expires_at"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "{path} does not exist (is imsd running?)"),
        ("{not json", "{path} is not valid JSON"),
        ('{"access_token": "tok-1"}', NO_EXPIRY),
        ('{"access_token": "tok-1", "expires_at": "soon"}', NO_EXPIRY),
        ('{"access_token": "tok-1", "expires_at": null}', NO_EXPIRY),
    ],
)
def test_unusable_token_files(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "alpha" / "token.json"
    if content is not None:
        path.parent.mkdir()
        path.write_text(content)
    with pytest.raises(ImsdUnavailable) as e:
        token("alpha", output_dir=tmp_path)
    assert str(e.value) == message.format(path=path)


def test_document_without_headers(tmp_path: Path) -> None:
    write_doc(tmp_path, "alpha", {**doc_expiring_in(3600), "headers": {}})
    assert token("alpha", output_dir=tmp_path) == "tok-1"
    with pytest.raises(ImsdUnavailable, match=r"^alpha: token document has no headers$"):
        headers("alpha", output_dir=tmp_path)


@pytest.mark.parametrize("content", ["null", "[]", '"tok-1"'])
def test_token_file_that_is_not_an_object(tmp_path: Path, content: str) -> None:
    path = tmp_path / "alpha" / "token.json"
    path.parent.mkdir()
    path.write_text(content)
    with pytest.raises(ImsdUnavailable):
        token("alpha", output_dir=tmp_path)


def _stale_socket(path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))  # bound, never listening: what a crashed daemon leaves behind


@pytest.mark.parametrize(
    "make",
    [
        lambda path: None,  # no socket at all
        _stale_socket,
        lambda path: path.write_text(""),  # a regular file where the socket should be
    ],
    ids=["missing", "stale", "regular-file"],
)
def test_daemon_not_running(tmp_path: Path, make: Callable[[Path], object]) -> None:
    sock = tmp_path / "imsd.sock"
    make(sock)
    for call in (
        lambda: token("alpha", socket=sock),
        lambda: headers("alpha", socket=sock),
        lambda: request("GET", "/v1/credentials", socket=sock),
    ):
        with pytest.raises(ImsdUnavailable) as e:
            call()
        assert str(e.value) == f"imsd is not running (no socket at {sock})"
        assert (e.value.status, e.value.code) == (None, None)


# -- permission denied, as another user -------------------------------------------------------


def _as(user: User, groups: list[int], call: Callable[[], object]) -> str:
    """What *call* raises in a forked child running as *user* with these supplementary
    *groups* (what that user's login would have): the child needs no file of this
    checkout's (often under /root), everything is imported already."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        out = "no error"
        try:
            os.close(r)
            os.setgroups(groups)
            os.setresgid(user.gid, user.gid, user.gid)
            os.setresuid(user.uid, user.uid, user.uid)
            call()
        except ImsdUnavailable as e:
            out = str(e)
        except BaseException as e:
            out = f"{type(e).__name__}: {e}"
        finally:
            os.write(w, out.encode())
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    assert os.waitpid(pid, 0)[1] == 0
    return out


@pytest.fixture
def guarded(world: Path, make_user: Any) -> Iterator[tuple[Path, str, int]]:
    """A listening socket and a token file under *world*/run (root:GROUP 0750), as the unit
    makes them: (run directory, group name, gid)."""
    name, gid = make_user.group()
    run = world / "run"
    (run / "tokens" / "aep").mkdir(parents=True)
    os.chown(run, 0, gid)
    run.chmod(0o750)
    (run / "tokens" / "aep" / "token.json").write_text("{}")
    with contextlib.suppress(ImsdUnavailable):
        request("GET", "/v1/credentials", socket=world / "missing.sock")  # imports it all
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(run / "imsd.sock"))
        sock.listen(1)
        os.chown(run / "imsd.sock", 0, gid)
        (run / "imsd.sock").chmod(0o660)
        yield run, name, gid


def test_a_user_outside_the_group_is_told_permission_denied_and_which_group(
    guarded: tuple[Path, str, int], make_user: Any
) -> None:
    run, group, _ = guarded
    outsider = make_user()
    sock = run / "imsd.sock"
    said = _as(outsider, [], lambda: request("GET", "/v1/credentials", socket=sock))
    assert said == (
        f"permission denied: {sock}: {run} is root:{group} 0750;"
        f' group {group} has access: sudo usermod -aG {group} "$USER", then log in again'
    )
    path = run / "tokens" / "aep" / "token.json"
    said = _as(outsider, [], lambda: token("aep", output_dir=run / "tokens"))
    assert said.startswith(f"permission denied: {path}: {run} is root:{group} 0750; group "), said


def test_a_member_whose_login_predates_the_group_is_told_to_log_in_again(
    guarded: tuple[Path, str, int], make_user: Any
) -> None:
    run, group, gid = guarded
    member = make_user(groups=(group,))
    sock = run / "imsd.sock"
    said = _as(member, [], lambda: request("GET", "/v1/credentials", socket=sock))
    assert said.endswith(f"; you joined group {group} after this login: log in again"), said
    # With the group (a new login), the socket itself is reached (it only listens: no answer).
    said = _as(member, [gid], lambda: request("GET", "/", socket=sock, timeout=0.2))
    assert said == f"imsd socket {sock}: ReadTimeout", said


def test_a_socket_only_its_owner_may_use_says_so(
    guarded: tuple[Path, str, int], make_user: Any
) -> None:
    run, group, gid = guarded
    (run / "imsd.sock").chmod(0o600)
    member = make_user(groups=(group,))
    sock = run / "imsd.sock"
    said = _as(member, [gid], lambda: request("GET", "/v1/credentials", socket=sock))
    assert said == f"permission denied: {sock} is root:{group} 0600; only root has access"


def test_default_paths() -> None:
    # The defaults document where a packaged daemon puts things (or the IMSD_* overrides).
    expected_dir = os.environ.get("IMSD_OUTPUT_DIR", "/run/imsd/tokens")
    expected_sock = os.environ.get("IMSD_SOCKET", "/run/imsd/imsd.sock")
    assert Path(expected_dir) == client.DEFAULT_OUTPUT_DIR
    assert Path(expected_sock) == client.DEFAULT_SOCKET


# -- import lightness -----------------------------------------------------------------------

#: Modules only the daemon needs; an application importing imsd.client must not pay for them.
#: anyio is not on the list: it is no daemon module, and httpx may load it.
DAEMON_DEPENDENCIES = ("structlog", "pydantic", "pluggy", "prometheus_client")


def daemon_modules(modules: list[str]) -> list[str]:
    return [
        m
        for m in modules
        if (m.startswith("imsd.") and m != "imsd.client") or m.split(".")[0] in DAEMON_DEPENDENCIES
    ]


def test_import_loads_no_daemon_module(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""\
        import json, sys
        from imsd.client import ImsdUnavailable, token
        try:
            token("alpha", socket={str(tmp_path / "imsd.sock")!r})
        except ImsdUnavailable:
            pass
        print(json.dumps(sorted(sys.modules)))
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=30
    )
    assert r.returncode == 0, r.stderr
    modules = json.loads(r.stdout)
    assert "imsd.client" in modules  # the check would pass vacuously otherwise
    assert "httpx" in modules
    assert daemon_modules(modules) == []
    # And the check itself can fail: a daemon module is noticed.
    assert daemon_modules([*modules, "imsd.daemon", "structlog._config"]) == [
        "imsd.daemon",
        "structlog._config",
    ]
