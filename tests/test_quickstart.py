"""The README's "Quick start: systemd", run as written against a throwaway root.

Every command of the quick start's ``sh`` block runs, with ``/etc``, ``/opt``, ``/run``,
``/var/lib`` and ``/usr/local`` moved under a temporary root, ``imsd-clients`` renamed to
a throwaway group and the daemon's user ``imsd`` to a throwaway user; ``sudo`` lines run as
root, the others as a throwaway consumer (the ``$USER`` the quick start adds to the group).
Three lines are not run as written:

- the venv and ``pip install`` line: the checkout's own ``.venv/bin/imsd`` stands in for
  ``/opt/imsd/bin/imsd`` (no network, no minutes of installing);
- the ``systemd-sysusers`` line: the installed ``sysusers.d`` file, with the user and the
  group renamed, is the one ``systemd-sysusers`` is told to apply (not every file of the
  machine's);
- the ``systemctl`` line: systemd is not PID 1 here, so :class:`Unit` does what starting
  ``imsd.socket`` and ``imsd.service`` would: the socket as the socket unit describes it, the
  unit's directories, its ``LoadCredential=`` files in ``$CREDENTIALS_DIRECTORY``, and its
  ``ExecStart=`` with ``${VAR}`` expanded, run as ``User=`` in ``Group=`` with
  ``UMask=`` in ``PrivateUsers=``'s user namespace, with ``LISTEN_FDS``/``LISTEN_PID`` and
  ``NOTIFY_SOCKET`` (``READY=1`` is awaited).

The CLI's default paths (``/etc/imsd/imsd.toml``, ``/run/imsd/imsd.sock``, ...) are moved
under the root through ``CONFIGURATION_DIRECTORY`` (as optional as the default file) and
``IMSD_*`` for the quick start's commands; the daemon gets only what the unit gives it, plus
two variables of this test's: ``IMSD_IMS_URL`` (the fake IMS instead of Adobe's) and an empty
``IMSD_METRICS_ADDRESS`` (no port shared with parallel runs). The rest of the sandbox
(mount namespaces, seccomp, capabilities) is tests/test_sandbox.py's and tests/test_deploy.py's.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from imsd.config import load_settings
from imsd.fakeims.server import FakeIms

from tests.requirements import need_root, need_tool

ROOT = Path(__file__).resolve().parent.parent
DOWNLOAD = ROOT / "tests" / "fixtures" / "console" / "oauth-s2s.json"
GROUP = "imsd-clients"
MOVED = ("/etc", "/opt", "/run", "/var/lib", "/usr/local")
# What systemd does between fork and exec, as far as the daemon can tell: PrivateUsers=yes (a
# user namespace mapping only root and the unit's user and group: the maps are written from
# the parent namespace, by a child forked before unshare), the unit's uid, gid and UMask=, and
# the socket as fd 3 with LISTEN_PID naming the process that execs.
SHIM = textwrap.dedent(
    """
    import ctypes, os, sys
    fd, uid, gid, umask, argv = *map(int, sys.argv[1:4]), int(sys.argv[4], 8), sys.argv[5:]
    r, w = os.pipe()
    helper = os.fork()
    if helper == 0:
        os.close(w)
        os.read(r, 1)
        for name, ident in (("uid_map", uid), ("gid_map", gid)):
            with open(f"/proc/{os.getppid()}/{name}", "w") as f:
                f.write(f"0 0 1\\n{ident} {ident} 1\\n")
        os._exit(0)
    os.close(r)
    if ctypes.CDLL(None, use_errno=True).unshare(0x10000000) != 0:  # CLONE_NEWUSER
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
    os.write(w, b"x")
    assert os.waitpid(helper, 0)[1] == 0, "writing the user namespace maps failed"
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    os.umask(umask)
    os.dup2(fd, 3)
    os.close(fd)
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.execv(argv[0], argv)
    """
)


def quickstart() -> list[str]:
    """The command lines of the README's "Quick start: systemd" block."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Quick start: systemd\n", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "no sh block in the systemd quick start"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_quickstart_block_has_what_this_test_replaces() -> None:
    lines = quickstart()
    assert [line for line in lines if "systemctl" in line] == [
        "sudo systemctl daemon-reload && sudo systemctl enable --now imsd.socket imsd"
    ]
    assert [line.split("#")[0].strip() for line in lines if "sysusers" in line] == [
        "sudo install -D -m 0644 systemd/imsd.sysusers.conf /etc/sysusers.d/imsd.conf"
        " && sudo systemd-sysusers"
    ]
    assert sum("-m venv /opt/imsd" in line and "pip install" in line for line in lines) == 1


def test_a_missing_default_config_under_systemd_is_no_error(tmp_path: Path) -> None:
    env = {"CONFIGURATION_DIRECTORY": str(tmp_path)}
    assert load_settings(env=env).allowed_gids == []
    (tmp_path / "imsd.toml").write_text("allowed_gids = [4242]\n")
    assert load_settings(env=env).allowed_gids == [4242]


# -- the throwaway machine -------------------------------------------------------------------


@dataclass
class Machine:
    root: Path
    group: str
    user: str
    home: Path
    daemon_user: str
    log: list[str] = field(default_factory=list)

    def moved(self, text: str) -> str:
        """*text* with the system paths under the root and the group renamed."""
        pattern = "|".join(re.escape(p) for p in MOVED)
        text = re.sub(rf"(?<![\w./~-])({pattern})(?=/|\s|$)", lambda m: f"{self.root}{m[1]}", text)
        return re.sub(rf"\b{GROUP}\b", self.group, text)

    def cli_env(self) -> dict[str, str]:
        r = self.root
        env = {k: v for k, v in os.environ.items() if not k.startswith(("IMSD_", "LISTEN_"))}
        env.pop("NOTIFY_SOCKET", None)
        env.update(
            PATH=f"{r}/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
            HOME=str(self.home),
            USER=self.user,
            CONFIGURATION_DIRECTORY=f"{r}/etc/imsd",
            IMSD_CREDENTIALS_DIR=f"{r}/etc/imsd/credentials",
            IMSD_OUTPUT_DIR=f"{r}/run/imsd/tokens",
            IMSD_STATE_DIR=f"{r}/var/lib/imsd",
            IMSD_SOCKET=f"{r}/run/imsd/imsd.sock",
        )
        return env

    def as_user(self, setpriv: list[str] | None, argv: list[str]) -> list[str]:
        """*argv* run as another user (``setpriv`` options; None: *argv* changes user
        itself), in a mount namespace where this Python is reachable to that user."""
        # e.g. a pyenv under /root (0700): a tmpfs /root holding only what is needed.
        script, back = "set -e\n", ""
        for i, (top, children) in enumerate(sorted(hidden_paths().items())):
            for j, child in enumerate(sorted(children)):
                aside = self.root / ".aside" / f"{i}-{j}"
                aside.mkdir(parents=True, exist_ok=True)
                script += f"mount --bind {child} {aside}\n"
                back += f"mkdir -p {child}\nmount --bind {aside} {child}\n"
            script += f"mount -t tmpfs -o mode=0755 tmpfs {top}\n"
        script += back
        script += f'exec setpriv {" ".join(setpriv)} "$@"' if setpriv else 'exec "$@"'
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *argv]

    def sh(self, line: str, *, as_consumer: bool) -> subprocess.CompletedProcess[str]:
        cmd = ["sh", "-c", self.moved(line)]
        if as_consumer:
            ids = [f"--reuid={self.user}", f"--regid={self.user}", "--init-groups"]
            cmd = self.as_user(ids, cmd)
        r = subprocess.run(
            cmd, cwd=ROOT, env=self.cli_env(), capture_output=True, text=True, timeout=120
        )
        self.log.append(f"$ {line}\n{r.stdout}{r.stderr}(exit {r.returncode})")
        return r

    def run_quickstart(self) -> None:
        """Every line up to ``systemctl``; the venv line replaced (module docstring)."""
        for line in quickstart():
            if "systemctl" in line:
                return
            if "systemd-sysusers" in line:
                self.sysusers(line)
                continue
            if "-m venv" in line:
                bin_dir = self.root / "opt" / "imsd" / "bin"
                bin_dir.mkdir(parents=True)
                (bin_dir / "imsd").symlink_to(Path(sys.executable).parent / "imsd")
                continue
            r = self.sh(line.replace("sudo ", ""), as_consumer="sudo" not in line)
            assert r.returncode == 0, "\n".join(self.log)
        raise AssertionError("no systemctl line in the quick start")

    def sysusers(self, line: str) -> None:
        """The install as written; then the installed file, renamed, is what is applied."""
        install, sysusers = line.split("#")[0].split("&&")
        assert sysusers.split() == ["sudo", "systemd-sysusers"], line
        assert self.sh(install.replace("sudo ", ""), as_consumer=False).returncode == 0
        conf = self.root / "etc" / "sysusers.d" / "imsd.conf"
        text = re.sub(rf"\b{GROUP}\b", self.group, conf.read_text())
        text = re.sub(r"^u imsd ", f"u {self.daemon_user} ", text, flags=re.M)
        assert self.daemon_user in text, text
        conf.write_text(text)
        r = self.sh(f"systemd-sysusers {conf}", as_consumer=False)
        assert r.returncode == 0, "\n".join(self.log)


@pytest.fixture
def machine(fake: FakeIms) -> Iterator[Machine]:
    need_root("the quick start creates a group and runs the daemon as another user")
    for tool in ("useradd", "groupadd", "setpriv", "unshare", "mount", "install", "getent"):
        need_tool(tool, "apt-get install passwd util-linux mount coreutils libc-bin")
    need_tool("systemd-sysusers", "apt-get install systemd (.ci/run does)")
    download = json.loads(DOWNLOAD.read_text())
    fake.state.add_client(
        download["CLIENT_ID"],
        secrets=download["CLIENT_SECRETS"][:1],
        scopes=download["SCOPES"],
        org_id=download["ORG_ID"],
    )
    # Not pytest's tmp_path: the daemon's uid and the consumer must traverse it.
    root = Path(tempfile.mkdtemp(prefix="imsd-quickstart-"))
    root.chmod(0o755)
    for d in ("etc/systemd/system", "usr/local/bin", "run", "var/lib"):
        (root / d).mkdir(parents=True)
    tag = secrets.token_hex(4)
    user, group = f"imsdq{tag}", f"imsdc{tag}"
    home = root / "home" / user
    (home / "Downloads").mkdir(parents=True)
    shutil.copy(DOWNLOAD, home / "Downloads" / "aep-oauth.json")
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user],
        check=True,
        capture_output=True,
    )
    m = Machine(root, group, user, home, f"imsdd{tag}")
    try:
        yield m
    finally:
        for name in (user, m.daemon_user):
            subprocess.run(["userdel", name], check=False, capture_output=True)
        with contextlib.suppress(KeyError):
            grp.getgrnam(group)
            subprocess.run(["groupdel", group], check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


# -- what systemctl start would do -----------------------------------------------------------


def unit_file(m: Machine, name: str, section: str) -> dict[str, list[str]]:
    """*section*'s assignments in the installed unit and its drop-ins, in order, with the
    paths and group moved as the quick start's were (the same files on a real machine)."""
    system = m.root / "etc" / "systemd" / "system"
    files = [system / name, *sorted((system / f"{name}.d").glob("*.conf"))]
    out: dict[str, list[str]] = {}
    for path in files:
        current = None
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                current = line.strip("[]")
            elif current == section:
                key, _, value = line.partition("=")
                out.setdefault(key, []).append(m.moved(value))
    return out


def hidden_paths() -> dict[Path, set[Path]]:
    """Directories other users cannot traverse on the way to this Python or this checkout
    (its venv and sources), each with its children on those ways: empty when other users
    can run the checkout's imsd as it is."""
    hidden: dict[Path, set[Path]] = {}
    for target in (Path(sys.executable).resolve(), Path(sys.executable).absolute(), ROOT):
        here = Path("/")
        for part in target.parts[1:-1]:
            here = here / part
            if not here.stat().st_mode & 0o001:
                hidden.setdefault(here, set()).add(here / target.relative_to(here).parts[0])
                break
    return hidden


def expand(word: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda v: env[v[1]], word)


class Unit:
    """``systemctl start imsd.socket imsd.service``, as far as a test can do it as root."""

    def __init__(self, m: Machine, extra_env: dict[str, str]) -> None:
        self.m = m
        sock_unit = unit_file(m, "imsd.socket", "Socket")
        svc = unit_file(m, "imsd.service", "Service")
        gid = grp.getgrnam(svc["Group"][-1]).gr_gid
        assert svc["User"][-1] == "imsd", svc["User"]  # the sysusers.d file's, renamed
        uid = pwd.getpwnam(m.daemon_user).pw_uid
        self.uid, self.gid = uid, gid

        # imsd.socket: parents 0755 (DirectoryMode=), the socket's mode and group.
        self.socket_path = Path(sock_unit["ListenStream"][-1])
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.socket_path))
        os.chown(self.socket_path, 0, grp.getgrnam(sock_unit["SocketGroup"][-1]).gr_gid)
        self.socket_path.chmod(int(sock_unit["SocketMode"][-1], 8))
        self.listener.listen(64)

        # The unit's directories: configuration is never chowned; state and runtime are the
        # service's (recursively when the owner differs: the socket inode too).
        r = m.root
        conf = r / "etc" / svc["ConfigurationDirectory"][-1]
        state = r / "var" / "lib" / svc["StateDirectory"][-1]
        runtime = r / "run" / svc["RuntimeDirectory"][-1]
        conf.mkdir(parents=True, exist_ok=True)
        conf.chmod(int(svc["ConfigurationDirectoryMode"][-1], 8))
        for d, key in ((state, "StateDirectoryMode"), (runtime, "RuntimeDirectoryMode")):
            d.mkdir(parents=True, exist_ok=True)
            for p in [d, *d.rglob("*")]:
                os.lchown(p, uid, gid)
            d.chmod(int(svc[key][-1], 8))

        # LoadCredential=ID:PATH: a private copy only the service's user can read.
        creds = r / "run" / "credentials" / "imsd.service"
        creds.mkdir(parents=True)
        for spec in svc.get("LoadCredential", []):
            ident, _, source = spec.partition(":")
            (creds / ident).write_bytes(Path(source).read_bytes())  # missing: start fails
            (creds / ident).chmod(0o400)
            os.chown(creds / ident, uid, gid)
        creds.chmod(0o500)
        os.chown(creds, uid, gid)

        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify_path = r / "run" / "systemd" / "notify"
        notify_path.parent.mkdir(parents=True, exist_ok=True)
        self.notify.bind(str(notify_path))
        notify_path.chmod(0o777)

        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "HOME": "/",
            "USER": "imsd",
            "LOGNAME": "imsd",
            "SHELL": "/usr/sbin/nologin",
            "CONFIGURATION_DIRECTORY": str(conf),
            "STATE_DIRECTORY": str(state),
            "RUNTIME_DIRECTORY": str(runtime),
            "CREDENTIALS_DIRECTORY": str(creds),
            "LISTEN_FDS": "1",
            "LISTEN_FDNAMES": "imsd.socket",
            "NOTIFY_SOCKET": str(notify_path),
        }
        for assignment in svc.get("Environment", []):
            for item in shlex.split(assignment):
                key, _, value = item.partition("=")
                env[key] = value
        env.update(extra_env)
        argv = [expand(word, env) for word in shlex.split(svc["ExecStart"][-1])]
        self.log_path = r / "imsd.log"
        with self.log_path.open("wb") as log:
            assert svc["PrivateUsers"][-1] == "yes"
            fd, mask = str(self.listener.fileno()), svc["UMask"][-1]
            shim = [sys.executable, "-c", SHIM, fd, str(uid), str(gid), mask, *argv]
            self.proc = subprocess.Popen(
                m.as_user(None, shim),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(self.listener.fileno(),),
            )

    def wait_ready(self) -> None:
        """Until the daemon sends ``READY=1`` (it exiting first fails the test)."""
        self.notify.settimeout(1.0)
        for _ in range(60):
            assert self.proc.poll() is None, self.log_path.read_text()
            with contextlib.suppress(TimeoutError):
                if b"READY=1" in self.notify.recv(4096).split(b"\n"):
                    return
        raise AssertionError(f"no READY=1 in 60 s\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.listener.close()
        self.notify.close()


@pytest.fixture
def start(machine: Machine, fake: FakeIms) -> Iterator[Callable[[], Unit]]:
    units: list[Unit] = []

    def go() -> Unit:
        u = Unit(machine, {"IMSD_IMS_URL": fake.url, "IMSD_METRICS_ADDRESS": ""})
        units.append(u)
        u.wait_ready()
        return u

    yield go
    for u in units:
        u.stop()


# -- the quick start -------------------------------------------------------------------------


def test_quickstart_serves_the_clients_group(machine: Machine, start: Callable[[], Unit]) -> None:
    machine.run_quickstart()
    unit = start()
    after = quickstart()
    after = after[next(i for i, line in enumerate(after) if "systemctl" in line) + 1 :]
    assert after, "the quick start shows nothing after starting the unit"
    out = {}
    for line in after:  # imsd status, cat the headers: as the consumer
        r = machine.sh(line, as_consumer="sudo" not in line)
        assert r.returncode == 0, "\n".join(machine.log) + unit.log_path.read_text()
        out[line.split()[0]] = r.stdout
    status, headers = out["imsd"], out["cat"]
    assert re.search(r"^aep +valid ", status, re.M), status
    token = machine.sh("imsd token aep", as_consumer=True)
    assert token.returncode == 0, token.stderr
    assert f"Authorization: Bearer {token.stdout.strip()}" in headers, headers
    # The secret on disk is root's alone: the daemon's token came through LoadCredential=.
    st = (machine.root / "etc" / "imsd" / "credentials" / "aep.secret").stat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)
    # What the daemon made is the group's and no one else's.
    tokens = machine.root / "run" / "imsd" / "tokens" / "aep"
    st = (tokens / "token").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (unit.uid, unit.gid, 0o640)
    assert oct(unit.socket_path.stat().st_mode & 0o777) == "0o660"


def test_quickstart_unit_starts_without_a_config_file(
    machine: Machine, start: Callable[[], Unit]
) -> None:
    machine.run_quickstart()
    (machine.root / "etc" / "imsd" / "imsd.toml").unlink()
    unit = start()
    # Root (the default allow-list) is served; the group is not, without allowed_gids.
    assert machine.sh("imsd token aep", as_consumer=False).returncode == 0
    refused = machine.sh("imsd status", as_consumer=True)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    # Inside PrivateUsers= the consumer is nobody: only its group (the unit's) can be allowed.
    assert "api.peer_refused uid=65534 gid=65534" in unit.log_path.read_text()
    st = (machine.root / "run" / "imsd" / "tokens" / "aep" / "token").stat()
    assert st.st_mode & 0o777 == 0o600
