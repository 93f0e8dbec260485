"""Attacks from the outside review (issue 13), replayed against a real daemon process: local
users exhausting descriptors, a user removed from the allow-list, supplementary groups, and
forced-refresh floods. Real processes, real sockets, real second users (created when the
suite runs as root; skipped otherwise, but never under ``CI=true``)."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from imsd.daemon import FD_RESERVE, connection_cap
from imsd.fakeims.server import FakeIms

from tests.requirements import need_root, need_tool
from tests.support import ORG, SCOPES, SECRET, write_cred

# The peer runs as another user, who cannot read this checkout's venv (often under /root):
# a system Python with the standard library is all it needs.
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")


def _need_root() -> None:
    need_root("a throwaway second user plays the local attacker")
    need_tool("useradd", "apt-get install passwd")
    need_tool("python3", "apt-get install python3 (the other user's client)")


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int


@pytest.fixture
def make_user() -> Iterator[object]:
    """``make_user(groups=[...])`` creates a throwaway system user; removed at the end."""
    _need_root()
    made_users: list[str] = []
    made_groups: list[str] = []

    def make(groups: tuple[str, ...] = ()) -> User:
        name = f"imsdt{secrets.token_hex(4)}"
        cmd = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
        if groups:
            cmd += ["--groups", ",".join(groups)]
        subprocess.run([*cmd, name], check=True, capture_output=True)
        made_users.append(name)
        import pwd

        pw = pwd.getpwnam(name)
        return User(name, pw.pw_uid, pw.pw_gid)

    def group() -> tuple[str, int]:
        name = f"imsdg{secrets.token_hex(4)}"
        subprocess.run(["groupadd", "--system", name], check=True, capture_output=True)
        made_groups.append(name)
        import grp

        return name, grp.getgrnam(name).gr_gid

    make.group = group  # type: ignore[attr-defined]
    yield make
    for name in made_users:
        subprocess.run(["userdel", name], check=False, capture_output=True)
    for name in made_groups:
        subprocess.run(["groupdel", name], check=False, capture_output=True)


@pytest.fixture
def world() -> Iterator[Path]:
    """A directory other users can traverse (pytest's tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="imsd-attack-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class DaemonProc:
    def __init__(self, root: Path, config: str, *, nofile: int | None = None) -> None:
        self.root = root
        self.socket = root / "run" / "imsd.sock"
        self.config = root / "imsd.toml"
        self.metrics_port = _free_port()
        self.write_config(config)
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMSD_")}

        def limit() -> None:  # the container default that the review's attack ran into
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.stderr = (root / "stderr.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "imsd", "run", "--config", str(self.config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self.stderr,
            preexec_fn=limit,  # setrlimit only, before exec
        )

    def write_config(self, extra: str) -> None:
        r = self.root
        (r / "run").mkdir(mode=0o755, exist_ok=True)  # other users reach the socket
        values = {
            "credentials_dir": f'"{r / "creds"}"',
            "output_dir": f'"{r / "tokens"}"',
            "state_dir": f'"{r / "state"}"',
            "socket": f'"{self.socket}"',
            "socket_mode": '"666"',
            "metrics_address": f'"127.0.0.1:{self.metrics_port}"',
            "log_format": '"json"',
            "min_margin": "1.0",
            "backoff_initial": "0.2",
            "backoff_cap": "1.0",
            "recheck_interval": "0.5",
            "request_rate": "100.0",
        }
        for line in extra.splitlines():  # the test's own settings win
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
        tmp = r / "imsd.toml.tmp"
        tmp.write_text("".join(f"{k} = {v}\n" for k, v in values.items()))
        os.replace(tmp, self.config)

    def log(self) -> str:
        return (self.root / "stderr.log").read_text(errors="replace")

    def get(self, path: str, method: str = "GET", timeout: float = 5.0) -> httpx.Response:
        with httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)),
            base_url="http://imsd",
            timeout=timeout,
        ) as c:
            return c.request(method, path)

    def wait_ready(self, limit: float = 20.0) -> None:
        deadline = time.monotonic() + limit
        while True:
            assert self.proc.poll() is None, self.log()
            with contextlib.suppress(httpx.HTTPError):
                if self.get("/readyz").status_code == 200:
                    return
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.05)  # the daemon is another process: polled, under a deadline

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


@pytest.fixture
def daemon_proc(world: Path) -> Iterator[object]:
    procs: list[DaemonProc] = []

    def start(config: str = "", *, nofile: int | None = None) -> DaemonProc:
        d = DaemonProc(world, config, nofile=nofile)
        procs.append(d)
        return d

    yield start
    for d in procs:
        d.stop()


# -- High 1: descriptor exhaustion ----------------------------------------------------------


def _flood(addresses: Sequence[tuple[int, object]], count: int) -> list[socket.socket]:
    """Open *count* idle connections spread over the addresses (family, address)."""
    out: list[socket.socket] = []
    for i in range(count):
        family, address = addresses[i % len(addresses)]
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError, InterruptedError):
            s.connect_ex(address)  # type: ignore[arg-type]
        out.append(s)
    return out


def _read_under_flood(
    d: DaemonProc, fake: FakeIms, attack: list[socket.socket], ceiling: int
) -> tuple[float, set[bytes]]:
    """For 9 s, read the token file every 100 ms as an app would while idle connections flood
    the socket API and the metrics port (a second wave of 2,000 after 4 s, up to *ceiling*
    attacking sockets): the seconds the file held an expired token, and the tokens seen."""
    targets: list[tuple[int, object]] = [
        (socket.AF_INET, ("127.0.0.1", d.metrics_port)),
        (socket.AF_UNIX, str(d.socket)),
    ]
    token = d.root / "tokens" / "alpha" / "token"
    seen: set[bytes] = set()
    expired = 0.0
    started = time.monotonic()
    attack += _flood(targets, 2000)
    while time.monotonic() - started < 9.0:
        if time.monotonic() - started > 4.0 and len(attack) < ceiling:
            attack += _flood(targets, 2000)  # a second wave once the first was shed
        assert d.proc.poll() is None, f"the daemon died under the attack:\n{d.log()}"
        data = token.read_bytes()
        if fake.state.validate_token(data.decode()) is None:
            expired += 0.1
        seen.add(data)
        time.sleep(0.1)  # the reader's pace: a token file read every 100 ms
    return expired, seen


def test_descriptor_exhaustion_never_ends_the_daemon_nor_its_refreshes(
    world: Path, fake: FakeIms, daemon_proc: object
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4500:
        pytest.skip(f"the attacker needs 4,500 descriptors; the hard limit here is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4500), hard))
    fake.state.token_lifetime = 3.0  # a refresh about every 2.4 s
    write_cred(world / "creds", "alpha", fake)
    d = daemon_proc(nofile=1024)  # type: ignore[operator]
    d.wait_ready()
    before = fake.state.request_count()
    attack: list[socket.socket] = []
    try:
        expired, seen = _read_under_flood(d, fake, attack, 4000)
        assert expired == 0, f"token expired for {expired:.1f} s of 9"  # never expired
        # Served while still under attack: a new client sheds an idle attacker.
        assert d.get("/livez").status_code == 200
        r = httpx.get(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=5)
        assert 'imsd_http_connection_events_total{event="shed",listener="metrics"}' in r.text
    finally:
        for s in attack:
            s.close()
    # ~2.4 s apart: three or more new tokens in 9 s, each one written.
    assert fake.state.request_count() - before >= 3
    assert len(seen) >= 3
    assert d.proc.poll() is None


# -- issue 23 Low 12: a proxy's connections hold two descriptors each ------------------------


@pytest.mark.parametrize(
    ("configured", "nofile", "proxies", "cap"),
    [
        (1024, 65536, 0, 1024),  # the unit's limit: the configured cap
        (1024, 1024, 0, 384),  # (1024 - 256) / 2: the socket API's and the metrics'
        (1024, 1024, 1, 192),  # a proxy's connections count twice: (1024 - 256) / (2 + 2)
        (1024, 1024, 3, 96),
        (1024, 65536, 40, 796),
        (1024, 300, 5, 8),  # never below 8
        (100, 65536, 2, 100),
    ],
)
def test_connection_cap_counts_every_listeners_descriptors(
    configured: int, nofile: int, proxies: int, cap: int
) -> None:
    got = connection_cap(configured, nofile, proxies)
    assert got == cap
    if got > 8:  # every listener full at once still leaves the reserve
        assert got * (2 + 2 * proxies) <= nofile - FD_RESERVE


class _Silent:
    """An upstream that accepts connections and never answers: each proxied request holds
    its descriptor in the daemon until the proxy's timeout."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                self.held.append(self.sock.accept()[0])

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for s in self.held:
            s.close()
        self.sock.close()


def _requests(port: int, count: int) -> list[socket.socket]:
    """*count* connections to the proxy, each with a request it sends upstream."""
    out: list[socket.socket] = []
    for _ in range(count):
        s = socket.socket()
        s.settimeout(2.0)
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        except OSError:
            pass  # refused or reset: the proxy was full
        out.append(s)
    return out


def test_a_proxy_flood_never_starves_token_writes_of_descriptors(
    world: Path, fake: FakeIms, daemon_proc: object
) -> None:
    """At RLIMIT_NOFILE=1024 one local user floods the socket API and the metrics port with
    idle connections and a TCP proxy with requests to an upstream that never answers (two
    descriptors each, neither idle nor sheddable): the token is rewritten every ~2.4 s
    meanwhile and never found expired, and no write fails for want of a descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 6500:
        pytest.skip(f"the attacker needs 6,500 descriptors; the hard limit here is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 6500), hard))
    fake.state.token_lifetime = 3.0  # a refresh about every 2.4 s
    upstream = _Silent()
    proxy_port = _free_port()
    write_cred(
        world / "creds",
        "alpha",
        fake,
        extra=(
            'products = ["aep-dev"]\n[product.aep-dev]\ntype = "aep"\nsandbox = "dev"\n'
            f'base_url = "http://127.0.0.1:{upstream.port}/"\n'
        ),
    )
    proxy = f'[{{ listen = "127.0.0.1:{proxy_port}", credential = "alpha", product = "aep-dev" }}]'
    d = daemon_proc(f"proxy = {proxy}\n", nofile=1024)  # type: ignore[operator]
    attack: list[socket.socket] = []
    try:
        d.wait_ready()
        before = fake.state.request_count()
        attack += _requests(proxy_port, 600)
        expired, seen = _read_under_flood(d, fake, attack, 4600)
        assert len(upstream.held) >= 100  # the proxy did hold upstream connections
    finally:
        for s in attack:
            s.close()
        upstream.close()
    log = d.log()
    assert expired == 0, f"token expired for {expired:.1f} s of 9"
    assert "sink.write_failed" not in log, log
    assert fake.state.request_count() - before >= 3
    assert len(seen) >= 3
    assert d.proc.poll() is None


# -- High 2: SIGHUP applies the access rules -------------------------------------------------

PEER = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
for line in sys.stdin:  # one request per line read: a keep-alive connection across a reload
    s.sendall(b"GET /v1/credentials/alpha/token HTTP/1.1\\r\\nHost: imsd\\r\\n\\r\\n")
    head = b""
    while b"\\r\\n\\r\\n" not in head:
        head += s.recv(65536)
    fields = [h.split(b":", 1) for h in head.split(b"\\r\\n")[1:] if b":" in h]
    length = int(dict((k.lower(), v) for k, v in fields)[b"content-length"])
    body = head.split(b"\\r\\n\\r\\n", 1)[1]
    while len(body) < length:
        body += s.recv(65536)
    print(head.split(b" ")[1].decode(), flush=True)
"""


def _peer(user: User, sock: Path) -> subprocess.Popen[str]:
    assert SYSTEM_PYTHON is not None
    return subprocess.Popen(
        [SYSTEM_PYTHON, "-I", "-c", PEER, str(sock)],
        user=user.uid,
        group=user.gid,
        extra_groups=list(os.getgrouplist(user.name, user.gid)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )


def _ask(peer: subprocess.Popen[str]) -> str:
    assert peer.stdin is not None
    assert peer.stdout is not None
    peer.stdin.write("go\n")
    peer.stdin.flush()
    line = peer.stdout.readline().strip()
    assert line, peer.stderr.read() if peer.stderr else ""
    return line


def _wait_for_log(d: DaemonProc, needle: str, count: int = 1, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while d.log().count(needle) < count:
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.05)  # another process's log file: polled, under a deadline


def test_sighup_applies_the_allow_list(
    world: Path, fake: FakeIms, daemon_proc: object, make_user: object
) -> None:
    user: User = make_user()  # type: ignore[operator]
    write_cred(world / "creds", "alpha", fake)
    d = daemon_proc(f"allowed_uids = [0, {user.uid}]\n")  # type: ignore[operator]
    d.wait_ready()
    peer = _peer(user, d.socket)
    try:
        assert _ask(peer) == "200"
        d.write_config("allowed_uids = [0]\n")
        d.proc.send_signal(signal.SIGHUP)
        _wait_for_log(d, "daemon.reloaded")
        assert _ask(peer) == "403"  # the same keep-alive connection, checked again
        fresh = _peer(user, d.socket)
        try:
            assert _ask(fresh) == "403"
        finally:
            fresh.kill()
            fresh.wait()
    finally:
        peer.kill()
        peer.wait()
    assert "daemon.reload_needs_restart" not in d.log()


def test_supplementary_group_members_are_allowed(
    world: Path, fake: FakeIms, daemon_proc: object, make_user: object
) -> None:
    group_name, gid = make_user.group()  # type: ignore[attr-defined]
    member: User = make_user(groups=(group_name,))  # type: ignore[operator]
    outsider: User = make_user()  # type: ignore[operator]
    assert member.gid != gid  # the group is a supplementary one, not the primary
    write_cred(world / "creds", "alpha", fake)
    d = daemon_proc(f"allowed_uids = [0]\nallowed_gids = [{gid}]\n")  # type: ignore[operator]
    d.wait_ready()
    for user, want in ((member, "200"), (outsider, "403")):
        peer = _peer(user, d.socket)
        try:
            assert _ask(peer) == want, user
        finally:
            peer.kill()
            peer.wait()


def test_refused_peers_are_logged_once_a_minute_and_counted(
    world: Path, fake: FakeIms, daemon_proc: object, make_user: object
) -> None:
    user: User = make_user()  # type: ignore[operator]
    write_cred(world / "creds", "alpha", fake)
    d = daemon_proc("allowed_uids = [0]\n")  # type: ignore[operator]
    d.wait_ready()
    peer = _peer(user, d.socket)
    try:
        for _ in range(300):
            assert _ask(peer) == "403"
    finally:
        peer.kill()
        peer.wait()
    assert d.log().count("api.peer_refused") == 1
    text = httpx.get(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=5).text
    assert 'imsd_socket_requests_total{code="403",endpoint="refused"} 300.0' in text


# -- issue 23 Medium 10: who may use a TCP proxy ------------------------------------------------

PROXY_PEER = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"GET /data/foundation/catalog/datasets HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n\\r\\n")
head = b""
while b"\\r\\n" not in head:
    data = s.recv(65536)
    if not data:
        break
    head += data
print(head.split(b" ")[1].decode() if head else "closed", flush=True)
"""


def _proxy_status(user: User, port: int) -> str:
    assert SYSTEM_PYTHON is not None
    done = subprocess.run(
        [SYSTEM_PYTHON, "-I", "-c", PROXY_PEER, str(port)],
        user=user.uid,
        group=user.gid,
        extra_groups=list(os.getgrouplist(user.name, user.gid)),
        capture_output=True,
        text=True,
        cwd="/",
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_tcp_proxy_serves_only_the_allowed_users(
    world: Path, fake: FakeIms, daemon_proc: object, make_user: object
) -> None:
    """Every local user could use a TCP proxy (and so the credential). Now the owner of the
    client's socket must pass the socket API's rule: an outsider gets 403 and nothing goes
    upstream; a supplementary member of an allowed group and root are served."""
    group_name, gid = make_user.group()  # type: ignore[attr-defined]
    member: User = make_user(groups=(group_name,))  # type: ignore[operator]
    outsider: User = make_user()  # type: ignore[operator]
    write_cred(
        world / "creds",
        "alpha",
        fake,
        extra=(
            'products = ["aep-dev"]\n[product.aep-dev]\ntype = "aep"\nsandbox = "dev"\n'
            f'base_url = "{fake.url}/gateway/aep/"\n'
        ),
    )
    port = _free_port()
    proxy = f'[{{ listen = "127.0.0.1:{port}", credential = "alpha", product = "aep-dev" }}]'
    d = daemon_proc(  # type: ignore[operator]
        f"allowed_uids = [0]\nallowed_gids = [{gid}]\nproxy = {proxy}\n"
    )
    d.wait_ready()
    assert _proxy_status(outsider, port) == "403"
    assert _proxy_status(member, port) == "200"
    r = httpx.get(f"http://127.0.0.1:{port}/data/foundation/catalog/datasets", timeout=10)
    assert r.status_code == 200, r.text
    text = httpx.get(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=5).text
    assert 'imsd_proxy_requests_total{instance="aep-dev",status="refused"} 1.0' in text
    assert f'"uid": {outsider.uid}' in d.log()  # proxy.peer_refused names the uid


# -- Medium 9: forced refreshes of a failing credential ---------------------------------------


def _failed_once(d: DaemonProc, name: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        for row in d.get("/v1/credentials").json()["credentials"]:
            if row["name"] == name and row["last_error"]:
                return True
    return False


def test_forced_refresh_flood_on_a_failing_credential_obeys_backoff(
    world: Path, fake: FakeIms, daemon_proc: object
) -> None:
    write_cred(world / "creds", "bad", fake, secret="p8e-wrong-00000000000000000")
    d = daemon_proc("min_refresh_interval = 5.0\nbackoff_cap = 30.0\n")  # type: ignore[operator]
    deadline = time.monotonic() + 20
    while not _failed_once(d, "bad"):  # its first attempt ended (invalid_client)
        assert time.monotonic() < deadline, d.log()
        assert d.proc.poll() is None, d.log()
        time.sleep(0.05)  # the daemon's socket, polled under a deadline
    before = fake.state.request_count()
    statuses = [d.get("/v1/credentials/bad/refresh", method="POST") for _ in range(200)]
    assert fake.state.request_count() - before <= 1
    assert {r.status_code for r in statuses} <= {429, 502}
    limited = [r for r in statuses if r.status_code == 429]
    assert len(limited) >= 199
    assert int(limited[0].headers["Retry-After"]) >= 1
    assert limited[0].json()["error"] == "too_many_requests"


# -- Medium 11: where a credential file may read secrets from --------------------------------


def test_secrets_and_template_sources_outside_the_secret_roots_are_never_read(
    world: Path, fake: FakeIms, daemon_proc: object
) -> None:
    """A credential file's writer picks its ims_url: naming /etc/shadow (or any file the
    daemon can read) as its secret would send the file there. Only the daemon's config says
    where secrets may be (secret_roots); a file elsewhere, directly or through a symlink in
    the credentials directory, is an error of that credential, and IMS never sees a request
    for it; the other credentials are served."""
    creds, elsewhere, vault = world / "creds", world / "elsewhere", world / "vault"
    for d in (creds, elsewhere, vault):
        d.mkdir()
    stolen = "p8e-ContentOfAFileOutsideEveryRoot-0123"
    (elsewhere / "shadow").write_text(stolen + "\n")
    (elsewhere / "page.tmpl").write_text("stolen: " + stolen + "\n")
    (vault / "vaulted.secret").write_text(stolen + "\n")
    (creds / "link.secret").symlink_to(elsewhere / "shadow")
    # IMS would accept the file's content as the secret: a request would mint a token.
    for client in ("shadow", "outside", "linked", "vaulted", "tpl"):
        fake.state.add_client(client, secrets=[stolen, SECRET], scopes=SCOPES, org_id=ORG)
    for name, client, ref in (
        ("shadow", "shadow", "/etc/shadow"),
        ("outside", "outside", str(elsewhere / "shadow")),
        ("linked", "linked", "link.secret"),
        ("vaulted", "vaulted", str(vault / "vaulted.secret")),
    ):
        (creds / f"{name}.toml").write_text(
            f'client_id = "{client}"\nclient_secret_file = "{ref}"\norg_id = "{ORG}"\n'
            f'scopes = {json.dumps(SCOPES)}\nims_url = "{fake.url}"\n'
        )
    write_cred(
        creds,
        "tpl",
        fake,
        client_id="tpl",
        extra=f'[[template]]\nsource = "{elsewhere / "page.tmpl"}"\ndestination = "page"\n',
    )
    write_cred(creds, "good", fake)
    d = daemon_proc(f'secret_roots = ["{vault}"]\n')  # type: ignore[operator]
    d.wait_ready()
    rows = {row["name"]: row for row in d.get("/v1/credentials").json()["credentials"]}
    assert rows["good"]["state"] == "valid"
    assert rows["vaulted"]["state"] == "valid"  # inside a root the config added
    log = d.log()
    for name, field in (
        ("shadow", "client_secret_file"),
        ("outside", "client_secret_file"),
        ("linked", "client_secret_file"),
        ("tpl", "template[0].source"),
    ):
        assert fake.state.request_count(name) == 0, name
        assert not (d.root / "tokens" / name).exists(), name
        line = next(line for line in log.splitlines() if f"{name}.toml" in line)
        assert field in line, line
        assert "outside every secret root" in line, line
        assert "secret_roots" in line, line
    assert stolen not in log
    assert "root:" not in log  # nothing of /etc/shadow
    out = subprocess.run(
        [sys.executable, "-m", "imsd", "check", "--config", str(d.config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("IMSD_")},
    )
    assert out.returncode == 1
    assert f"{creds / 'shadow.toml'}: client_secret_file: /etc/shadow is outside" in out.stderr
    assert stolen not in out.stdout + out.stderr
