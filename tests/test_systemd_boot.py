"""The README's "Quick start: systemd" under a real systemd as PID 1 (Debian bookworm's 252,
booted with ``systemd-nspawn -b``; tests/nspawn.py), and what a new user would check next.

The consumer ``alice`` (in sudoers) runs the quick start's block, extracted from README.md, in
a copy of this checkout: every line up to ``systemctl`` in one login session, the
``systemctl`` line in another, and the lines after it (``imsd status``, the headers file) in a
third, fresh login, as the README's "takes effect at its next login" says. ``bob`` is an
outsider. Three things are this test's, not the quick start's:

- the machine's pip configuration (``/etc/pip.conf``): no index, the wheels from the host
  (the container has no network), so ``pip install .`` runs as written;
- the fake IMS, ``imsd fake-ims`` as a transient unit (``systemd-run``), started just before
  the ``systemctl`` line with the download's client registered (``POST /_fake/clients``);
- a drop-in ``imsd.service.d/fake-ims.conf`` setting ``IMSD_IMS_URL`` to that fake.

The container boots once per module; each test leaves imsd running as it found it, so the
tests hold in any order (the ones that restart, stop or reload wait until it is back).
``make test-long`` runs these; without root, ``systemd-nspawn`` or (for the first build of the
cached rootfs) ``mmdebstrap`` they skip with one line naming the package, and under
``CI=true`` they fail instead.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.nspawn import Container, booted, cache_dir, rootfs, wheels
from tests.requirements import need_root
from tests.test_quickstart import quickstart

pytestmark = pytest.mark.long

ROOT = Path(__file__).resolve().parent.parent
DOWNLOAD = json.loads((ROOT / "tests" / "fixtures" / "console" / "oauth-s2s.json").read_text())
SECRET = DOWNLOAD["CLIENT_SECRETS"][0]
CONSUMER, OUTSIDER = "alice", "bob"
FAKE = "http://127.0.0.1:8765"
CHECKOUT, WHEELS = "/mnt/imsd-checkout", "/mnt/imsd-wheels"
TOKENS = "/run/imsd/tokens/aep"
RAW_GET = """
import socket
s = socket.socket(socket.AF_UNIX)
s.connect("/run/imsd/imsd.sock")
s.sendall(b"GET /v1/credentials HTTP/1.1\\r\\nHost: imsd\\r\\nConnection: close\\r\\n\\r\\n")
print(s.recv(64).split()[1].decode())
"""
SETUP = f"""
set -e
useradd -m -s /bin/bash {CONSUMER}
useradd -m -s /bin/bash {OUTSIDER}
echo '{CONSUMER} ALL=(ALL) NOPASSWD: ALL' > /etc/sudoers.d/{CONSUMER}
printf '[global]\\nno-index = true\\nfind-links = {WHEELS}\\n' > /etc/pip.conf
cp -r {CHECKOUT} /home/{CONSUMER}/imsd
mkdir /home/{CONSUMER}/Downloads
cp {CHECKOUT}/tests/fixtures/console/oauth-s2s.json /home/{CONSUMER}/Downloads/aep-oauth.json
chown -R {CONSUMER}: /home/{CONSUMER}
"""


def requirements() -> list[str]:
    """imsd's dependencies and its build backend: what ``pip install .`` needs."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [*meta["build-system"]["requires"], *meta["project"]["dependencies"]]


def checkout_copy(dest: Path) -> Path:
    """The checkout's files as git sees them (tracked and new, not ignored: no .venv)."""
    names = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, names):
        src = ROOT / name.decode()
        if src.is_file():
            (dest / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name.decode())
    return dest


@dataclass
class Machine:
    c: Container
    first_start: list[dict[str, Any]]  # imsd.service's journal entries up to READY

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.c.out(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props))
        return dict(line.split("=", 1) for line in out.splitlines())

    def cursor(self) -> str:
        out = self.c.out("journalctl -n 0 --show-cursor -q --no-pager")
        return out.strip().removeprefix("-- cursor: ")

    def journal(self, after: str, *options: str) -> list[dict[str, Any]]:
        """imsd.service's entries after the cursor *after*."""
        args = " ".join(shlex.quote(o) for o in options)
        out = self.c.out(f"journalctl -u imsd --after-cursor={shlex.quote(after)} -o json {args}")
        return [json.loads(line) for line in out.splitlines()]

    def events(self, after: str) -> list[str]:
        return [str(e.get("MESSAGE", "")).split(" ", 1)[0] for e in self.journal(after)]

    def wait_event(self, after: str, *names: str, limit: float = 60) -> str:
        """The first of *names* the daemon logs after *after* (polls the journal)."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            for event in self.events(after):
                if event in names:
                    return event
            time.sleep(0.2)  # journalctl --follow would need a reader thread; the poll is short
        pytest.fail(f"none of {names} in imsd's journal within {limit:g} s: {self.events(after)}")

    def ims_requests(self) -> int:
        get = f"urllib.request.urlopen('{FAKE}/_fake/stats').read().decode()"
        code = f"import urllib.request; print({get})"
        return int(json.loads(self.c.out(f"python3 -c {shlex.quote(code)}"))["requests"])

    def consumer(self, line: str, user: str = CONSUMER) -> subprocess.CompletedProcess[str]:
        return self.c.run(line, user=user, check=False)

    def active(self) -> None:
        state = self.show("imsd", "ActiveState", "SubState")
        assert state == {"ActiveState": "active", "SubState": "running"}, state


def start_fake_ims(c: Container) -> None:
    c.run("systemd-run --unit=fake-ims --quiet /opt/imsd/bin/imsd fake-ims --port 8765")
    register = f"""
import json, sys, time, urllib.request
body = json.dumps({{"client_id": {DOWNLOAD["CLIENT_ID"]!r}, "secrets": [{SECRET!r}],
    "scopes": {DOWNLOAD["SCOPES"]!r}, "org_id": {DOWNLOAD["ORG_ID"]!r}}}).encode()
for _ in range(100):
    try:
        urllib.request.urlopen("{FAKE}/_fake/clients", data=body)
        break
    except OSError:
        time.sleep(0.1)  # a transient unit with no readiness notice: polled, 10 s at most
else:
    sys.exit("the fake IMS did not answer")
"""
    c.run("python3", input=register)
    c.run(
        "mkdir -p /etc/systemd/system/imsd.service.d && printf '[Service]\\n"
        f"Environment=IMSD_IMS_URL={FAKE}\\n' > /etc/systemd/system/imsd.service.d/fake-ims.conf"
    )


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    need_root("systemd-nspawn boots a container")
    cache = cache_dir()
    image, wheel_dir = rootfs(cache), wheels(cache, requirements())
    work = tmp_path_factory.mktemp("systemd")
    src = checkout_copy(work / "checkout")
    lines = quickstart()
    at = next(i for i, line in enumerate(lines) if "systemctl" in line)
    with booted(image, {src: CHECKOUT, wheel_dir: WHEELS}, work / "console.log") as c:
        c.run(SETUP)
        c.run("set -ex\ncd ~/imsd\n" + "\n".join(lines[:at]), user=CONSUMER, timeout=600)
        start_fake_ims(c)
        m = Machine(c, [])
        before = m.cursor()
        c.run(lines[at], user=CONSUMER)
        m.first_start = m.journal(before)
        yield m


def test_ready_and_a_start_without_warnings(machine: Machine) -> None:
    """Type=notify: active only after READY=1; no line at warning or worse on the way."""
    machine.active()
    assert machine.show("imsd", "Type", "NotifyAccess") == {
        "Type": "notify",
        "NotifyAccess": "main",
    }
    assert "daemon.ready" in [str(e["MESSAGE"]).split(" ")[0] for e in machine.first_start]
    loud = [
        f"<{e['PRIORITY']}> {e['MESSAGE']}" for e in machine.first_start if int(e["PRIORITY"]) <= 4
    ]
    assert not loud, "\n".join(loud)


def test_directories_and_token_files_belong_to_the_group(machine: Machine) -> None:
    out = machine.c.out(f"stat -c '%n|%F|%a|%U:%G' /run/imsd {TOKENS} {TOKENS}/*")
    kinds = {path: tuple(rest) for path, *rest in (line.split("|") for line in out.splitlines())}
    assert kinds["/run/imsd"] == ("directory", "750", "imsd:imsd-clients"), out
    files = {p: v for p, v in kinds.items() if p.startswith(f"{TOKENS}/")}
    assert f"{TOKENS}/aep.headers" in files, out
    assert {v[1:] for v in files.values()} == {("640", "imsd:imsd-clients")}, out


def test_the_socket_is_systemds_with_the_group(machine: Machine) -> None:
    sock = machine.show("imsd.socket", "ActiveState", "Listen")
    assert sock == {"ActiveState": "active", "Listen": "/run/imsd/imsd.sock (Stream)"}, sock
    assert "imsd.socket" in machine.show("imsd", "TriggeredBy")["TriggeredBy"]
    out = machine.c.out("stat -c '%F %a %G' /run/imsd/imsd.sock").strip()
    assert out == "socket 660 imsd-clients", out
    # The daemon was handed the socket (fd 3), it did not bind one itself.
    pid = machine.show("imsd", "MainPID")["MainPID"]
    fd3 = machine.c.out(f"readlink /proc/{pid}/fd/3").strip()
    listening = machine.c.out("cat /proc/net/unix")
    assert fd3.startswith("socket:["), fd3
    assert any(
        line.split()[-1] == "/run/imsd/imsd.sock" and f"socket:[{line.split()[6]}]" == fd3
        for line in listening.splitlines()[1:]
        if len(line.split()) == 8
    ), (fd3, listening)


def test_the_secret_reaches_the_daemon_only(machine: Machine) -> None:
    cred = "/run/credentials/imsd.service/aep.secret"
    assert machine.c.out(f"stat -c '%a %U' {cred}").strip() in ("400 imsd", "400 root"), cred
    as_daemon = "setpriv --reuid=imsd --regid=imsd-clients --init-groups cat"
    assert machine.c.out(f"{as_daemon} {cred}").strip() == SECRET
    on_disk = machine.c.out("stat -c '%a %U' /etc/imsd/credentials/aep.secret").strip()
    assert on_disk == "600 root"
    for user in (CONSUMER, OUTSIDER):
        r = machine.consumer(f"cat {cred} /etc/imsd/credentials/aep.secret", user)
        assert r.returncode != 0, (user, r)
        assert SECRET not in r.stdout, user
        assert r.stderr.count("Permission denied") == 2, (user, r.stderr)


def test_a_group_member_gets_the_tokens(machine: Machine) -> None:
    """The quick start's last lines, in a fresh login of the consumer it added to the group."""
    lines = quickstart()
    tail = lines[next(i for i, line in enumerate(lines) if "systemctl" in line) + 1 :]
    assert tail, "nothing after systemctl in the quick start"
    for line in tail:
        r = machine.consumer(line)
        assert r.returncode == 0, (line, r)
    token = machine.c.out(f"cat {TOKENS}/token").strip()
    status = machine.consumer("imsd status")
    assert status.returncode == 0, status
    assert "aep" in status.stdout, status
    assert machine.consumer("imsd token aep").stdout.strip() == token
    headers = machine.consumer("imsd headers aep")
    assert headers.returncode == 0, headers
    assert token in headers.stdout, headers
    assert token in machine.consumer(f"cat {TOKENS}/aep.headers").stdout


def test_an_outsider_is_told_permission_denied(machine: Machine) -> None:
    r = machine.consumer("imsd status", OUTSIDER)
    assert r.returncode != 0, r
    assert "permission denied" in r.stderr, r.stderr
    assert "imsd-clients" in r.stderr, r.stderr  # the group that grants access
    assert "not running" not in r.stderr, r.stderr
    r = machine.consumer(f"cat {TOKENS}/token", OUTSIDER)
    assert r.returncode != 0, r
    assert "Permission denied" in r.stderr, r


def test_a_restart_asks_ims_nothing(machine: Machine) -> None:
    before, asked = machine.cursor(), machine.ims_requests()
    machine.c.run("systemctl restart imsd")
    machine.active()
    assert "state.restored" in machine.events(before), machine.events(before)
    assert machine.ims_requests() == asked


def test_the_watchdog_restarts_a_stopped_daemon(machine: Machine) -> None:
    """SIGSTOP: no WATCHDOG=1 for WatchdogSec (30 s), so systemd kills it and restarts it,
    and the restart asks IMS nothing either."""
    before, asked = machine.cursor(), machine.ims_requests()
    old = machine.show("imsd", "MainPID", "NRestarts")
    machine.c.run(f"kill -STOP {old['MainPID']}")
    deadline = time.monotonic() + 90
    while machine.show("imsd", "NRestarts")["NRestarts"] == old["NRestarts"]:
        assert time.monotonic() < deadline, "no restart within 90 s of SIGSTOP"
        time.sleep(1)  # WatchdogSec is 30 s: a slow poll of a slow event
    machine.wait_event(before, "daemon.ready")
    machine.active()
    units = machine.c.out(f"journalctl --after-cursor={shlex.quote(before)} -o cat -u imsd")
    assert "Watchdog timeout" in units, units
    assert machine.show("imsd", "MainPID")["MainPID"] != old["MainPID"]
    assert machine.ims_requests() == asked


def test_reload_and_a_broken_config_keeps_the_old_one(machine: Machine) -> None:
    config = machine.c.out("cat /etc/imsd/imsd.toml")
    pid = machine.show("imsd", "MainPID")["MainPID"]
    before = machine.cursor()
    machine.c.run("systemctl reload imsd")
    assert (
        machine.wait_event(before, "daemon.reloaded", "daemon.reload_failed") == "daemon.reloaded"
    )
    broken = machine.cursor()
    machine.c.run("printf 'allowed_gids = [\\n' > /etc/imsd/imsd.toml && systemctl reload imsd")
    try:
        got = machine.wait_event(broken, "daemon.reloaded", "daemon.reload_failed")
        assert got == "daemon.reload_failed"
        failed = [e for e in machine.journal(broken) if "daemon.reload_failed" in e["MESSAGE"]]
        assert failed[0]["PRIORITY"] == "3", failed  # journald took the <3> prefix: error
        # The client reads imsd.toml too (and says it is broken): a raw request shows that the
        # daemon's allowed_gids still admits the group.
        assert machine.consumer(f"python3 -c {shlex.quote(RAW_GET)}").stdout.strip() == "200"
    finally:
        machine.c.run("cat > /etc/imsd/imsd.toml", input=config)
        fixed = machine.cursor()
        machine.c.run("systemctl reload imsd")
        machine.wait_event(fixed, "daemon.reloaded")
    assert machine.show("imsd", "MainPID")["MainPID"] == pid
    machine.active()


def test_stop_exits_0_and_the_socket_starts_it_again(machine: Machine) -> None:
    machine.c.run("systemctl stop imsd.service")
    stopped = machine.show("imsd", "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert stopped == {
        "ActiveState": "inactive",
        "Result": "success",
        "ExecMainCode": "1",  # CLD_EXITED
        "ExecMainStatus": "0",
    }, stopped
    assert machine.show("imsd.socket", "ActiveState")["ActiveState"] == "active"
    status = machine.consumer("imsd status")  # connecting starts the service
    assert status.returncode == 0, status
    machine.active()


def test_journald_gets_priorities_not_prefixes(machine: Machine) -> None:
    daemon = [e for e in machine.first_start if e.get("SYSLOG_IDENTIFIER") == "imsd"]
    assert daemon, machine.first_start
    ready = [e for e in daemon if str(e["MESSAGE"]).startswith("daemon.ready")]
    assert ready, daemon
    assert ready[0]["PRIORITY"] == "6", ready
    assert not [e["MESSAGE"] for e in daemon if re.match(r"<\d>", str(e["MESSAGE"]))]


def test_no_secret_and_no_token_in_the_journal(machine: Machine) -> None:
    token = machine.c.out(f"cat {TOKENS}/token").strip()
    assert len(token) > 20
    everything = machine.c.out("journalctl -b -o json --no-pager", timeout=120)
    assert everything.count("\n") > 100  # the whole boot, not an empty read
    assert SECRET not in everything
    assert token not in everything


def test_exposure_and_verify(machine: Machine) -> None:
    out = machine.c.out("systemd-analyze security --no-pager imsd.service")
    score = re.search(r"Overall exposure level for imsd\.service: (\d+\.\d+)", out)
    assert score, out
    assert float(score[1]) <= 1.5, out.splitlines()[-1]
    units = "/etc/systemd/system/imsd.service /etc/systemd/system/imsd.socket"
    r = machine.c.run(f"systemd-analyze verify {units}", check=False)
    assert (r.returncode, r.stdout + r.stderr) == (0, ""), r
