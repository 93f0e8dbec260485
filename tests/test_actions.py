"""``on_refresh`` actions: parsing (pure), running (real processes), and through the daemon."""

from __future__ import annotations

import functools
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from imsd.actions import (
    Action,
    parse_action,
    pid_file_problem,
    process_problem,
    process_uids,
    run_action,
)
from imsd.daemon import Daemon
from imsd.fakeims.server import FakeIms
from imsd.model import CredentialError
from imsd.registry import load_registry
from structlog.testing import capture_logs

from tests.support import force_refresh, make_settings, wait_for, write_cred

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({}, "exactly one of signal or command"),
        ({"signal": {"pid_file": "p", "signal": "HUP"}, "command": ["x"]}, "exactly one"),
        ({"command": []}, "non-empty list"),
        ({"command": "systemctl reload app"}, "non-empty list of strings (no shell)"),
        ({"command": ["x"], "timeout": 0}, "between 0 and 600"),
        ({"command": ["x"], "timeout": True}, "a number of seconds"),
        ({"signal": {"pid_file": "p", "signal": "NOPE"}}, "unknown signal 'NOPE'"),
        ({"signal": {"pid_file": "p"}}, "pid_file"),
        ({"command": ["x"], "retries": 3}, "on_refresh.retries: unknown field"),
        ({"command": ["x"], "pass_env": "HOME"}, "on_refresh.pass_env: a list of environment"),
        ({"command": ["x"], "pass_env": ["A=B"]}, "on_refresh.pass_env: a list of environment"),
        ({"command": ["x"], "pass_env": ["A", "A"]}, "on_refresh.pass_env: lists a name twice"),
        (
            {"signal": {"pid_file": "p", "signal": "HUP"}, "pass_env": ["A"]},
            "on_refresh.pass_env: applies to command",
        ),
    ],
)
def test_parse_errors_name_the_field(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="on_refresh") as err:
        parse_action(table, Path("/etc/imsd/credentials"))
    assert message in str(err.value)


def test_parse_resolves_and_normalizes() -> None:
    base = Path("/etc/imsd/credentials")
    a = parse_action({"signal": {"pid_file": "app.pid", "signal": "hup"}}, base)
    assert a == Action(signal=signal.SIGHUP, pid_file=base / "app.pid")
    b = parse_action({"command": ["systemctl", "reload", "app"], "timeout": 5}, base)
    assert (b.command, b.timeout, b.pass_env) == (("systemctl", "reload", "app"), 5.0, ())
    c = parse_action({"command": ["x"], "pass_env": ["HOME", "DBUS_SYSTEM_BUS_ADDRESS"]}, base)
    assert c.pass_env == ("HOME", "DBUS_SYSTEM_BUS_ADDRESS")


def test_a_bad_on_refresh_is_a_credential_file_error(tmp_path: Path) -> None:
    from imsd.credentials import parse_credentials

    text = (
        'client_id = "c"\nclient_secret = "s3cret-value"\norg_id = "o@AdobeOrg"\n'
        'scopes = ["openid"]\n[on_refresh]\nsignal = { pid_file = "a.pid", signal = "BOGUS" }\n'
    )
    with pytest.raises(CredentialError) as err:
        parse_credentials(tmp_path / "c.toml", text.encode(), env={})
    assert err.value.field == "on_refresh.signal.signal"


@pytest.fixture
def child(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A process that counts the SIGHUPs it receives in a file."""
    seen = tmp_path / "hups"
    script = textwrap.dedent(
        f"""
        import signal, sys, time
        n = 0
        def hup(*_):
            global n
            n += 1
            open({str(seen)!r}, "w").write(str(n))
        signal.signal(signal.SIGHUP, hup)
        print("ready", flush=True)
        while True:
            time.sleep(0.05)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    yield proc, seen
    proc.kill()
    proc.wait()


async def test_signal_action(tmp_path: Path, child: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, seen = child
    pid_file = tmp_path / "app.pid"
    pid_file.write_text(f"{proc.pid}\n")
    action = parse_action({"signal": {"pid_file": "app.pid", "signal": "HUP"}}, tmp_path)
    assert await run_action(action, credential="c", output_dir=tmp_path)
    await wait_for(lambda: seen.exists() and seen.read_text() == "1")
    # A missing pid file or a garbage one is reported, not raised.
    pid_file.write_text("not a pid")
    assert not await run_action(action, credential="c", output_dir=tmp_path)
    pid_file.unlink()
    assert not await run_action(action, credential="c", output_dir=tmp_path)


# -- pid files a less-privileged user could write ----------------------------------------------


@pytest.fixture
def other_uid() -> Iterator[int]:
    """The uid of a throwaway system user, removed afterwards (needs root)."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run this as root with useradd: it needs a second real user")
        pytest.skip("needs root and useradd to create a second user")
    name = f"imsdt{secrets.token_hex(4)}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    try:
        yield pwd.getpwnam(name).pw_uid
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


class Blocked:
    """A root-owned process that blocks SIGHUP and says which signals are pending: whether
    it was signalled is read, not waited for."""

    def __init__(self) -> None:
        script = textwrap.dedent(
            """
            import signal, sys
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
            print("ready", flush=True)
            for _ in sys.stdin:
                print(",".join(sorted(s.name for s in signal.sigpending())), flush=True)
            """
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self.readline() == "ready"

    def readline(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().decode().strip()

    def pending(self) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"?\n")
        self.proc.stdin.flush()
        return self.readline()


@pytest.fixture
def blocked() -> Iterator[Blocked]:
    b = Blocked()
    yield b
    b.proc.kill()
    b.proc.wait()


async def test_a_pid_file_owned_by_another_user_is_refused(
    tmp_path: Path, other_uid: int, blocked: Blocked
) -> None:
    pid_file = tmp_path / "app.pid"
    pid_file.write_text(f"{blocked.proc.pid}\n")
    pid_file.chmod(0o644)
    os.chown(pid_file, other_uid, -1)  # that user names a root process
    action = parse_action({"signal": {"pid_file": "app.pid", "signal": "HUP"}}, tmp_path)
    with capture_logs() as logs:
        assert not await run_action(action, credential="c", output_dir=tmp_path)
    assert blocked.pending() == ""  # not signalled
    [failed] = logs
    assert failed["event"] == "on_refresh.failed"
    assert f"owned by uid {other_uid}, not by the daemon's uid (0) or root" in failed["error"]
    os.chown(pid_file, 0, -1)  # the same file owned by root: signalled
    assert await run_action(action, credential="c", output_dir=tmp_path)
    assert blocked.pending() == "SIGHUP"


@pytest.mark.parametrize(
    ("prepare", "reason"),
    [
        (lambda p: p.chmod(0o664), "writable by group or others"),
        (lambda p: p.chmod(0o646), "writable by group or others"),
        (lambda p: os.link(p, p.with_name("second")), "more than one hard link"),
        (
            lambda p: (p.rename(p.with_name("real")), p.symlink_to("real")),
            "is a symlink; refusing",
        ),
    ],
    ids=["group-writable", "other-writable", "hard-link", "symlink"],
)
async def test_pid_files_others_could_have_written_are_refused(
    tmp_path: Path,
    blocked: Blocked,
    prepare: Callable[[Path], object],
    reason: str,
) -> None:
    pid_file = tmp_path / "app.pid"
    pid_file.write_text(f"{blocked.proc.pid}\n")
    pid_file.chmod(0o644)
    prepare(pid_file)
    action = parse_action({"signal": {"pid_file": "app.pid", "signal": "HUP"}}, tmp_path)
    with capture_logs() as logs:
        assert not await run_action(action, credential="c", output_dir=tmp_path)
    assert blocked.pending() == ""
    assert logs[0]["event"] == "on_refresh.failed"
    assert reason in logs[0]["error"]


def test_pid_file_and_process_rules() -> None:
    def st(uid: int, mode: int = 0o100644, nlink: int = 1) -> os.stat_result:
        return os.stat_result((mode, 0, 0, nlink, uid, 0, 0, 0, 0, 0))

    assert pid_file_problem(st(1000), daemon_uid=1000) is None
    assert pid_file_problem(st(0), daemon_uid=1000) is None
    assert "owned by uid 1001" in str(pid_file_problem(st(1001), daemon_uid=1000))
    assert "owned by uid 1001" in str(pid_file_problem(st(1001), daemon_uid=0))
    assert "regular" in str(pid_file_problem(st(0, mode=0o010644), daemon_uid=0))
    # The process must be one the owner could signal itself; root's pid files name anything.
    assert process_problem(42, owner=1000, uids=(1000, 1000)) is None
    assert process_problem(42, owner=1000, uids=(0, 1000)) is None  # a setuid program it ran
    assert process_problem(42, owner=0, uids=(1001, 1001)) is None
    problem = process_problem(42, owner=1000, uids=(0, 0))
    assert problem == "process 42 belongs to uid 0, not to the pid file's owner (uid 1000)"
    assert process_uids("Name:\tx\nUid:\t1000\t0\t1002\t0\n") == (1000, 1002)


async def test_command_action_env_failure_and_timeout(tmp_path: Path) -> None:
    out = tmp_path / "seen"
    script = f"import os; open({str(out)!r}, 'w').write(os.environ['IMSD_TOKEN_FILE'])"
    ok = Action(command=(sys.executable, "-c", script))
    assert await run_action(ok, credential="c", output_dir=tmp_path / "c")
    assert out.read_text() == str(tmp_path / "c" / "token")
    assert not await run_action(
        Action(command=(sys.executable, "-c", "raise SystemExit(3)")),
        credential="c",
        output_dir=tmp_path,
    )
    assert not await run_action(
        Action(command=("/nonexistent/cmd",)), credential="c", output_dir=tmp_path
    )
    started = time.monotonic()
    slow = Action(command=(sys.executable, "-c", "import time; time.sleep(30)"), timeout=0.3)
    assert not await run_action(slow, credential="c", output_dir=tmp_path)
    assert time.monotonic() - started < 20  # killed, not waited for


async def env_of(action_table: dict[str, Any], tmp_path: Path) -> dict[str, str]:
    """The environment an ``on_refresh`` command sees."""
    out = tmp_path / "env.json"
    script = f"import json, os; open({str(out)!r}, 'w').write(json.dumps(dict(os.environ)))"
    action = parse_action({"command": [sys.executable, "-c", script], **action_table}, tmp_path)
    assert await run_action(action, credential="c", output_dir=tmp_path / "c")
    env: dict[str, str] = json.loads(out.read_text())
    env.pop("LC_CTYPE", None)  # Python's own locale coercion may add it in the child
    return env


@pytest.fixture
def daemon_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The daemon's environment holds other credentials' client_secret_env values.
    monkeypatch.setenv("OTHER_CLIENT_SECRET", "p8e-AnotherCredentialsSecret")
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WANTED", "yes")
    monkeypatch.setenv("LANG", "C.UTF-8")
    monkeypatch.setenv("PATH", os.environ.get("PATH", "") + ":/opt/app/bin")
    monkeypatch.delenv("LC_ALL", raising=False)
    monkeypatch.delenv("TZ", raising=False)


@pytest.mark.usefixtures("daemon_env")
async def test_a_command_gets_a_minimal_environment(tmp_path: Path) -> None:
    env = await env_of({}, tmp_path)
    assert env == {
        "PATH": os.environ["PATH"],
        "LANG": "C.UTF-8",
        "IMSD_CREDENTIAL": "c",
        "IMSD_OUTPUT_DIR": str(tmp_path / "c"),
        "IMSD_TOKEN_FILE": str(tmp_path / "c" / "token"),
    }
    assert "p8e-AnotherCredentialsSecret" not in json.dumps(env)


@pytest.mark.usefixtures("daemon_env")
async def test_pass_env_adds_what_it_names(tmp_path: Path) -> None:
    env = await env_of({"pass_env": ["WANTED", "UNSET_HERE"]}, tmp_path)
    assert env["WANTED"] == "yes"
    assert "UNSET_HERE" not in env
    assert "OTHER_CLIENT_SECRET" not in env


async def test_daemon_runs_the_action_after_writing_each_new_token(
    tmp_path: Path, fake: FakeIms
) -> None:
    copy = tmp_path / "copied"
    script = (
        "import os, shutil; "
        f"shutil.copy(os.environ['IMSD_TOKEN_FILE'], {str(copy)!r} + '.tmp'); "
        f"os.replace({str(copy)!r} + '.tmp', {str(copy)!r})"
    )
    s = make_settings(tmp_path, min_refresh_interval=0.0)
    command = ", ".join(f'"{a}"' for a in (sys.executable, "-c", script.replace('"', '\\"')))
    write_cred(s.credentials_dir, "user", fake, extra=f"[on_refresh]\ncommand = [{command}]\n")
    async with anyio.create_task_group() as tg:
        d = Daemon(s, load_registry(), env={})
        await tg.start(functools.partial(d.run, handle_signals=False))
        token = s.output_dir / "user" / "token"
        await wait_for(lambda: copy.exists() and copy.read_text() == token.read_text())
        first = copy.read_text()
        r = await force_refresh(d)
        assert r.status_code == 200
        await wait_for(lambda: copy.read_text() == token.read_text() != first)
        tg.cancel_scope.cancel()
