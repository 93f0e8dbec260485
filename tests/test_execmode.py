"""``imsd exec``: real ``imsd exec`` processes around a real child, the token files of an
in-process daemon (or hand-written ones), forced rotation through the socket, forwarded
signals and exit codes; the pure helpers with tables."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from imsd.client import ImsdUnavailable
from imsd.daemon import Daemon
from imsd.execmode import ExecError, exec_env, parse_env_file, run_exec
from imsd.fakeims.server import FakeIms

from tests.support import ORG, uds, write_cred

pytestmark = pytest.mark.anyio

#: The child: reports its environment at start, and what it sees on each signal. Signals are
#: blocked before "start" is printed, so a test that waits for "start" can signal safely.
CHILD = """\
import json, os, signal, sys
SIGS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}
signal.pthread_sigmask(signal.SIG_BLOCK, SIGS)
env = {k: v for k, v in os.environ.items() if k.startswith("ADOBE_")}
print("start", os.getpid(), json.dumps(env), flush=True)
while True:
    sig = signal.sigwait(SIGS)
    if sig == signal.SIGHUP:
        with open(os.environ["CHILD_TOKEN_FILE"]) as f:
            print("hup", f.read().strip(), flush=True)
    elif sig == signal.SIGINT:
        print("int", flush=True)
    else:
        print("term", flush=True)
        sys.exit(42)
"""


# -- fixtures and helpers ------------------------------------------------------------------


def _iso(seconds_from_now: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds_from_now)).isoformat()


def write_tokens(
    output_dir: Path,
    name: str,
    access_token: str,
    *,
    products: Sequence[str] = ("generic",),
    expires_in: float = 3600,
    env_products: Sequence[str] | None = None,
) -> Path:
    """Hand-written daemon outputs (token, token.json, PRODUCT.env), each replaced atomically
    the daemon's way; returns the credential's directory."""
    d = output_dir / name
    d.mkdir(parents=True, exist_ok=True)
    doc = {
        "access_token": access_token,
        "expires_at": _iso(expires_in),
        "headers": {p: {"Authorization": f"Bearer {access_token}"} for p in products},
    }
    files = {"token": access_token, "token.json": json.dumps(doc)}
    for p in products if env_products is None else env_products:
        files[f"{p}.env"] = f"ADOBE_ACCESS_TOKEN={access_token}\nADOBE_PRODUCT={p}"
    for filename, text in files.items():
        tmp = d / f".{filename}.tmp"
        tmp.write_text(text)
        os.replace(tmp, d / filename)
    return d


class ExecProcess:
    """A running ``imsd exec``: the child's stdout lines, stderr for failure messages."""

    def __init__(self, proc: anyio.abc.Process, stderr: Path) -> None:
        self.proc = proc
        self.stderr_path = stderr
        assert proc.stdout is not None
        self._out = BufferedByteReceiveStream(proc.stdout)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    async def line(self, limit: float = 10.0) -> str:
        try:
            with anyio.fail_after(limit):
                return (await self._out.receive_until(b"\n", 1 << 16)).decode()
        except (TimeoutError, anyio.EndOfStream, anyio.IncompleteRead) as e:
            raise AssertionError(f"no line from the child; imsd exec stderr:\n{self.stderr}") from e

    async def start_line(self) -> tuple[int, dict[str, str]]:
        words = (await self.line()).split(" ", 2)
        assert words[0] == "start", words
        return int(words[1]), json.loads(words[2])

    async def wait(self, limit: float = 10.0) -> int:
        with anyio.fail_after(limit):
            return await self.proc.wait()

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)


@pytest.fixture
async def imsd_exec(tmp_path: Path) -> AsyncIterator[Any]:
    """Start ``imsd exec ARGS`` against ``tmp_path/tokens``; killed after the test."""
    started: list[tuple[ExecProcess, IO[bytes]]] = []
    config = tmp_path / "exec.toml"
    config.write_text("")

    async def start(
        *args: str,
        token_file: Path | None = None,
        output_dir: bool = True,
        env: dict[str, str] | None = None,
    ) -> ExecProcess:
        """Without *output_dir*, no --output-dir (a --socket in *args*, or *env*'s IMSD_*)."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(("IMSD_", "ADOBE_"))}
        env = {**base, **(env or {})}
        env["CHILD_TOKEN_FILE"] = str(token_file or tmp_path / "tokens" / "alpha" / "token")
        argv = [sys.executable, "-m", "imsd", "exec", "--config", str(config)]
        if output_dir:
            argv += ["--output-dir", str(tmp_path / "tokens")]
        argv += args
        stderr_path = tmp_path / f"exec-{len(started)}.stderr"
        err = stderr_path.open("wb")
        proc = await anyio.open_process(argv, env=env, stdin=None, stderr=err)
        p = ExecProcess(proc, stderr_path)
        started.append((p, err))
        return p

    yield start
    for p, err in started:
        if p.proc.returncode is None:  # forwarded to the child: neither is left behind
            p.proc.terminate()
            with anyio.move_on_after(5):
                await p.proc.wait()
        if p.proc.returncode is None:
            p.proc.kill()
        with anyio.move_on_after(5):
            await p.proc.wait()
        await p.proc.aclose()
        err.close()


def child(tmp_path: Path) -> list[str]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return [sys.executable, str(script)]


async def force_refresh(d: Daemon, name: str) -> str:
    async with uds(d) as c:
        r = await c.post(f"/v1/credentials/{name}/refresh")
    assert r.status_code == 200, r.text
    token: str = r.json()["access_token"]
    return token


# -- rotation with a real daemon ------------------------------------------------------------


async def test_signal_on_rotation_child_reads_new_token(
    tmp_path: Path, fake: FakeIms, running: Any, imsd_exec: Any
) -> None:
    write_cred(tmp_path / "creds", "alpha", fake)
    d = await running(min_refresh_interval=0)
    old = (tmp_path / "tokens" / "alpha" / "token").read_text()
    p = await imsd_exec("--signal", "HUP", "alpha", "--", *child(tmp_path))
    _, env = await p.start_line()
    assert env["ADOBE_ACCESS_TOKEN"] == old
    assert env["ADOBE_API_KEY"] == "client-a"
    assert env["ADOBE_ORG_ID"] == ORG
    new = await force_refresh(d, "alpha")
    assert new != old
    # The environment of a running process cannot change: on the signal it re-reads the file.
    assert await p.line() == f"hup {new}"
    p.signal(signal.SIGTERM)
    assert await p.line() == "term"
    assert await p.wait() == 42, p.stderr


async def test_restart_on_rotation_new_token_in_env(
    tmp_path: Path, fake: FakeIms, running: Any, imsd_exec: Any
) -> None:
    write_cred(tmp_path / "creds", "alpha", fake, extra='products = ["aep"]\n')
    d = await running(min_refresh_interval=0)
    old = (tmp_path / "tokens" / "alpha" / "token").read_text()
    p = await imsd_exec("--restart", "alpha", "--", *child(tmp_path))
    pid1, env1 = await p.start_line()
    assert env1["ADOBE_ACCESS_TOKEN"] == old
    assert env1["ADOBE_SANDBOX_NAME"] == "prod"  # the product's own variables
    new = await force_refresh(d, "alpha")
    assert await p.line() == "term"  # the old child is asked to stop...
    pid2, env2 = await p.start_line()  # ...and a new one started with the new token
    assert pid2 != pid1
    assert env2["ADOBE_ACCESS_TOKEN"] == new != old
    assert {k: v for k, v in env2.items() if k != "ADOBE_ACCESS_TOKEN"} == {
        k: v for k, v in env1.items() if k != "ADOBE_ACCESS_TOKEN"
    }
    p.signal(signal.SIGTERM)  # a forwarded SIGTERM stops it for good: no restart
    assert await p.line() == "term"
    assert await p.wait() == 42, p.stderr


# -- where the token comes from: --socket, --output-dir, or files then socket ---------------


async def test_socket_alone_asks_the_daemon_and_follows_rotation(
    tmp_path: Path, fake: FakeIms, running: Any, imsd_exec: Any
) -> None:
    """--socket without --output-dir: the token and variables come from the socket API (the
    default output_dir, which would not have them, is not read), and a rotation seen there
    restarts CMD with the new token."""
    write_cred(tmp_path / "creds", "alpha", fake, extra='products = ["aep"]\n')
    d = await running(min_refresh_interval=0)
    old = (tmp_path / "tokens" / "alpha" / "token").read_text()
    sock = str(tmp_path / "imsd.sock")
    p = await imsd_exec(
        "--socket", sock, "--restart", "alpha", "--", *child(tmp_path), output_dir=False
    )
    pid1, env1 = await p.start_line()
    assert env1["ADOBE_ACCESS_TOKEN"] == old
    assert env1["ADOBE_SANDBOX_NAME"] == "prod"  # the product's own variables, from the API
    new = await force_refresh(d, "alpha")
    assert await p.line() == "term"
    pid2, env2 = await p.start_line()
    assert pid2 != pid1
    assert env2["ADOBE_ACCESS_TOKEN"] == new != old
    p.signal(signal.SIGTERM)
    assert await p.line() == "term"
    assert await p.wait() == 42, p.stderr


async def test_without_either_flag_files_then_socket(
    tmp_path: Path, fake: FakeIms, running: Any, imsd_exec: Any
) -> None:
    """Neither flag: the configured output_dir (here one without the credential's files) is
    read first, then the configured socket answers."""
    write_cred(tmp_path / "creds", "alpha", fake)
    await running()
    token = (tmp_path / "tokens" / "alpha" / "token").read_text()
    env = {
        "IMSD_OUTPUT_DIR": str(tmp_path / "elsewhere"),
        "IMSD_SOCKET": str(tmp_path / "imsd.sock"),
    }
    p = await imsd_exec("alpha", "--", *child(tmp_path), output_dir=False, env=env)
    _, seen = await p.start_line()
    assert seen["ADOBE_ACCESS_TOKEN"] == token
    p.signal(signal.SIGTERM)
    assert await p.wait() == 42, p.stderr


@pytest.mark.parametrize(
    ("flags", "named", "not_named"),
    [
        # --socket alone: only the socket is tried, and named.
        (["--socket", "{tmp}/no.sock"], ["no socket at {tmp}/no.sock", "--socket"], ["token.json"]),
        # neither flag: both are tried, both named.
        ([], ["{tmp}/tokens/alpha/token.json", "socket {tmp}/no.sock"], []),
    ],
)
async def test_errors_name_every_source_tried(
    tmp_path: Path, imsd_exec: Any, flags: list[str], named: list[str], not_named: list[str]
) -> None:
    env = {"IMSD_OUTPUT_DIR": str(tmp_path / "tokens"), "IMSD_SOCKET": str(tmp_path / "no.sock")}
    args = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    marker = tmp_path / "ran"
    cmd = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    p = await imsd_exec(*args, "alpha", "--", *cmd, output_dir=False, env=env)
    assert await p.wait() == 1
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("imsd: "), p.stderr
    for needle in named:
        assert needle.replace("{tmp}", str(tmp_path)) in lines[0]
    for needle in not_named:
        assert needle not in lines[0]
    assert not marker.exists()


async def test_socket_errors_say_what_the_daemon_said(
    tmp_path: Path, fake: FakeIms, running: Any, imsd_exec: Any
) -> None:
    write_cred(tmp_path / "creds", "alpha", fake)
    await running()
    sock = str(tmp_path / "imsd.sock")
    p = await imsd_exec("--socket", sock, "nope", "--", "true", output_dir=False)
    assert await p.wait() == 1
    assert p.stderr.startswith("imsd: no credential named 'nope' (socket "), p.stderr
    assert f"imsd status --socket {sock}" in p.stderr
    p = await imsd_exec(
        "--socket", sock, "--product", "cja", "alpha", "--", "true", output_dir=False
    )
    assert await p.wait() == 1
    assert "alpha has no product 'cja'" in p.stderr


# -- exit codes, forwarded signals, errors (hand-written token files) -----------------------


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("sys.exit(0)", 0),
        ("sys.exit(7)", 7),
        ("sys.exit(255)", 255),
        ("os.kill(os.getpid(), signal.SIGKILL)", 128 + signal.SIGKILL),
        ("os.kill(os.getpid(), signal.SIGTERM)", 128 + signal.SIGTERM),
    ],
)
async def test_exit_code_is_propagated(
    tmp_path: Path, imsd_exec: Any, code: str, expected: int
) -> None:
    write_tokens(tmp_path / "tokens", "alpha", "tok-1")
    marker = tmp_path / "ran"
    script = f"import os, signal, sys; open({str(marker)!r}, 'w').close(); {code}"
    p = await imsd_exec("alpha", "--", sys.executable, "-c", script)
    assert await p.wait() == expected, p.stderr
    assert marker.exists()


@pytest.mark.parametrize(
    ("sig", "seen"),
    [(signal.SIGTERM, "term"), (signal.SIGINT, "int"), (signal.SIGHUP, "hup tok-1")],
)
async def test_signals_are_forwarded(
    tmp_path: Path, imsd_exec: Any, sig: signal.Signals, seen: str
) -> None:
    write_tokens(tmp_path / "tokens", "alpha", "tok-1")
    p = await imsd_exec("alpha", "--", *child(tmp_path))
    await p.start_line()
    p.signal(sig)  # to imsd exec only: the child hears of it through the forwarding
    assert await p.line() == f"{seen}"
    if sig != signal.SIGTERM:
        assert p.proc.returncode is None  # exec survives what the child survives
        p.signal(signal.SIGTERM)
        assert await p.line() == "term"
    assert await p.wait() == 42, p.stderr


async def test_unknown_credential_is_a_clear_error(tmp_path: Path, imsd_exec: Any) -> None:
    write_tokens(tmp_path / "tokens", "alpha", "tok-1")
    marker = tmp_path / "ran"
    p = await imsd_exec("nope", "--", sys.executable, "-c", f"open({str(marker)!r}, 'w')")
    assert await p.wait() == 1
    assert p.stderr.startswith("imsd: "), p.stderr
    assert str(tmp_path / "tokens" / "nope" / "token.json") in p.stderr
    assert "pass its --output-dir" in p.stderr  # the path it tried, and what to do
    assert len(p.stderr.splitlines()) == 1, p.stderr
    assert "Traceback" not in p.stderr
    assert not marker.exists()


@pytest.mark.parametrize(
    ("args", "message", "rc"),
    [
        (["alpha"], "no command given (imsd exec): put it after --", 2),
        (["alpha", "--"], "no command given (imsd exec): put it after --", 2),
        (["alpha", "ls", "-l"], "(ls -l): put -- before the command: imsd exec ", 2),
        (["alpha", "ls", "-l"], "tokens alpha -- ls -l", 2),  # the line to paste
        (["alpha", "env", "--help"], "alpha -- env --help", 2),  # not exec's help
        (["alpha", "true", "--restart"], "alpha -- true --restart", 2),  # whose --restart?
        (["--signal", "NOPE", "alpha", "--", "true"], "unknown signal 'NOPE'", 2),
    ],
)
async def test_usage_errors(
    tmp_path: Path, imsd_exec: Any, args: list[str], message: str, rc: int
) -> None:
    write_tokens(tmp_path / "tokens", "alpha", "tok-1")
    p = await imsd_exec(*args)
    assert await p.wait() == rc
    assert message in p.stderr
    assert len(p.stderr.splitlines()) == 1, p.stderr
    assert "usage:" not in p.stderr


async def test_expired_token_is_refused(tmp_path: Path, imsd_exec: Any) -> None:
    write_tokens(tmp_path / "tokens", "alpha", "tok-1", expires_in=-60)
    p = await imsd_exec("alpha", "--", "true")
    assert await p.wait() == 1
    assert "alpha: token expires in" in p.stderr
    assert "Traceback" not in p.stderr


async def test_options_after_the_name(tmp_path: Path, imsd_exec: Any) -> None:
    write_tokens(tmp_path / "tokens", "alpha", "tok-1")
    p = await imsd_exec("alpha", "--signal", "HUP", "--", *child(tmp_path))
    await p.start_line()
    write_tokens(tmp_path / "tokens", "alpha", "tok-2")
    assert await p.line() == "hup tok-2"
    p.signal(signal.SIGTERM)
    assert await p.wait() == 42


async def test_missing_command_is_a_clear_error(tmp_path: Path, imsd_exec: Any) -> None:
    write_tokens(tmp_path / "tokens", "alpha", "tok-1")
    p = await imsd_exec("alpha", "--", str(tmp_path / "no-such-command"))
    assert await p.wait() != 0
    assert "Traceback" not in p.stderr
    assert p.stderr.startswith("imsd: "), p.stderr
    assert str(tmp_path / "no-such-command") in p.stderr


async def test_restart_after_a_survived_sigint(tmp_path: Path, imsd_exec: Any) -> None:
    write_tokens(tmp_path / "tokens", "alpha", "tok-1")
    p = await imsd_exec("--restart", "alpha", "--", *child(tmp_path))
    await p.start_line()
    p.signal(signal.SIGINT)
    assert await p.line() == "int"  # the child handles SIGINT and keeps running
    write_tokens(tmp_path / "tokens", "alpha", "tok-2")
    assert await p.line() == "term"
    _, env = await p.start_line()
    assert env["ADOBE_ACCESS_TOKEN"] == "tok-2"


DRIVER = """\
import sys, anyio
from pathlib import Path
from imsd.execmode import run_exec
out, child = Path(sys.argv[1]), sys.argv[2:]
sys.exit(anyio.run(lambda: run_exec("alpha", child, output_dir=out, restart=True,
                                    poll_interval=0.02)))
"""


async def test_restart_waits_for_the_env_file(tmp_path: Path) -> None:
    out = tmp_path / "tokens"
    d = write_tokens(out, "alpha", "tok-1")
    (tmp_path / "driver.py").write_text(DRIVER)
    argv = [sys.executable, str(tmp_path / "driver.py"), str(out), *child(tmp_path)]
    env = {**os.environ, "CHILD_TOKEN_FILE": str(d / "token")}
    async with await anyio.open_process(argv, env=env, stdin=None, stderr=None) as proc:
        (tmp_path / "none").write_text("")  # its stderr goes to pytest's
        p = ExecProcess(proc, tmp_path / "none")
        try:
            _, env1 = await p.start_line()
            assert env1["ADOBE_ACCESS_TOKEN"] == "tok-1"
            # The daemon's order within one write: token, token.json, ..., generic.env.
            new = write_tokens(tmp_path / "next", "alpha", "tok-2")
            os.replace(new / "token", d / "token")
            os.replace(new / "token.json", d / "token.json")
            await anyio.sleep(0.3)  # a window like a slow fsync: many polls happen in it
            os.replace(new / "generic.env", d / "generic.env")
            tokens = []  # the tokens of the children started since
            with anyio.move_on_after(3):
                while "tok-2" not in tokens:
                    line = await p.line()
                    if line.startswith("start"):
                        tokens.append(json.loads(line.split(" ", 2)[2])["ADOBE_ACCESS_TOKEN"])
            assert tokens[-1:] == ["tok-2"], tokens
        finally:
            proc.terminate()
            with anyio.move_on_after(5):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()


# -- pure helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ("A=1\n", {"A": "1"}),
        ("A=1\nB=2", {"A": "1", "B": "2"}),
        ("A=1\r\nB=2\r\n", {"A": "1", "B": "2"}),
        ("# comment\nA=1\n", {"A": "1"}),
        ("#A=1\n", {}),
        ("\n\nA=1\n\n", {"A": "1"}),
        ("no equals sign\nA=1\n", {"A": "1"}),
        ("A=x=y==\n", {"A": "x=y=="}),  # base64 padding survives
        ("A=\n", {"A": ""}),
        ("A=1\nA=2\n", {"A": "2"}),  # the last one wins
        ("A= spaced value \n", {"A": " spaced value "}),  # taken verbatim, no shell quoting
        ("A='quoted'\n", {"A": "'quoted'"}),
        (
            "ADOBE_ACCESS_TOKEN=eyJ.a-b_c.d\nADOBE_ORG_ID=0123@AdobeOrg\n",
            {"ADOBE_ACCESS_TOKEN": "eyJ.a-b_c.d", "ADOBE_ORG_ID": "0123@AdobeOrg"},
        ),
    ],
)
def test_parse_env_file(text: str, expected: dict[str, str]) -> None:
    assert parse_env_file(text) == expected


@pytest.mark.parametrize(
    ("products", "env_products", "product", "expected"),
    [
        (["generic"], None, None, "generic"),
        (["aep", "generic"], None, None, "aep"),  # default: the credential's first product
        (["aep", "generic"], None, "generic", "generic"),
        ([], ["generic"], None, "generic"),  # a document without headers: generic
        (["aep"], ["aep", "cja"], "cja", "cja"),  # an explicit product needs only its file
    ],
)
def test_exec_env_chooses_the_product_file(
    tmp_path: Path,
    products: list[str],
    env_products: list[str] | None,
    product: str | None,
    expected: str,
) -> None:
    write_tokens(tmp_path, "alpha", "tok-1", products=products, env_products=env_products)
    assert exec_env(tmp_path, "alpha", product) == {
        "ADOBE_ACCESS_TOKEN": "tok-1",
        "ADOBE_PRODUCT": expected,
    }


def test_exec_env_missing_product_file(tmp_path: Path) -> None:
    write_tokens(tmp_path, "alpha", "tok-1", products=["aep", "generic"])
    with pytest.raises(ExecError) as e:
        exec_env(tmp_path, "alpha", "cja")
    assert str(tmp_path / "alpha" / "cja.env") in str(e.value)
    assert "['aep', 'generic']" in str(e.value)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("nothing", "token.json does not exist (is imsd running?)"),
        ("expired", "alpha: token expires in"),
        ("garbage", "token.json is not valid JSON"),
    ],
)
def test_exec_env_without_a_usable_token(tmp_path: Path, setup: str, message: str) -> None:
    if setup == "expired":
        write_tokens(tmp_path, "alpha", "tok-1", expires_in=-1)
    elif setup == "garbage":
        write_tokens(tmp_path, "alpha", "tok-1")
        (tmp_path / "alpha" / "token.json").write_text("{not json")
    with pytest.raises(ImsdUnavailable, match=re.escape(message)):
        exec_env(tmp_path, "alpha", None)


def test_exec_env_accepts_a_token_with_little_time_left(tmp_path: Path) -> None:
    write_tokens(tmp_path, "alpha", "tok-1", expires_in=5)  # the client's default wants 60 s
    assert exec_env(tmp_path, "alpha", None)["ADOBE_ACCESS_TOKEN"] == "tok-1"


async def test_run_exec_without_command(tmp_path: Path) -> None:
    write_tokens(tmp_path, "alpha", "tok-1")
    with pytest.raises(ExecError, match="no command given"):
        await run_exec("alpha", [], output_dir=tmp_path)


async def test_run_exec_unknown_credential_raises_exec_error(tmp_path: Path) -> None:
    with pytest.raises(ExecError, match="does not exist"):
        await run_exec("nope", ["true"], output_dir=tmp_path)


async def test_no_token_env_keeps_the_token_out_of_the_environment(
    tmp_path: Path, fake: FakeIms, running: Any, imsd_exec: Any
) -> None:
    write_cred(tmp_path / "creds", "alpha", fake)
    await running()
    token = (tmp_path / "tokens" / "alpha" / "token").read_text()
    p = await imsd_exec("--no-token-env", "alpha", "--", *child(tmp_path))
    pid, env = await p.start_line()
    assert "ADOBE_ACCESS_TOKEN" not in env
    assert env["ADOBE_API_KEY"] == "client-a"
    environ = await anyio.Path(f"/proc/{pid}/environ").read_bytes()
    assert token.encode() not in environ
    token_file = str(tmp_path / "tokens" / "alpha" / "token").encode()
    assert b"IMSD_TOKEN_FILE=" + token_file in environ.split(b"\0")
    p.signal(signal.SIGTERM)
    assert await p.line() == "term"
    await p.wait()
