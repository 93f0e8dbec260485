"""The ``imsd`` command as a user runs it: real subprocesses, real files, the real fake IMS."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from imsd.fakeims.server import FakeIms

ORG = "0123456789ABCDEF01234567@AdobeOrg"
SECRET = "p8e-CliSecretValue0123456789abcdef"


def imsd(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60, clean: bool = False
) -> subprocess.CompletedProcess[str]:
    """``imsd ARGS``; *clean*: without the caller's IMSD_* variables."""
    base = {k: v for k, v in os.environ.items() if not (clean and k.startswith("IMSD_"))}
    return subprocess.run(
        [sys.executable, "-m", "imsd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**base, **(env or {})},
        check=False,
    )


@pytest.fixture
def fake() -> Iterator[FakeIms]:
    with FakeIms.in_thread() as f:
        f.state.add_client("cli-client", secrets=[SECRET], scopes=["openid"], org_id=ORG)
        yield f


def cred(directory: Path, name: str, ims_url: str, secret_env: str = "CLI_SECRET") -> Path:
    directory.mkdir(exist_ok=True)
    path = directory / f"{name}.toml"
    path.write_text(
        f'auth = "oauth_server_to_server"\nclient_id = "cli-client"\n'
        f'client_secret_env = "{secret_env}"\norg_id = "{ORG}"\nscopes = ["openid"]\n'
        f'ims_url = "{ims_url}"\n'
    )
    return path


def test_check_valid_and_invalid(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    cred(creds, "ok", "https://ims-na1.adobelogin.com")
    r = imsd("check", "--credentials-dir", str(creds), env={"CLI_SECRET": SECRET})
    assert r.returncode == 0, r.stderr
    (creds / "bad.json").write_text(
        json.dumps(
            {
                "auth": "oauth_server_to_server",
                "client_id": "x",
                "client_secret": SECRET,
                "org_id": "nope",
                "scopes": ["openid"],
            }
        )
    )
    r = imsd("check", "--credentials-dir", str(creds), env={"CLI_SECRET": SECRET})
    assert r.returncode == 1
    assert "bad.json" in r.stderr
    assert "org_id" in r.stderr
    assert SECRET not in r.stderr + r.stdout


def test_once_writes_and_reports(tmp_path: Path, fake: FakeIms) -> None:
    creds, out = tmp_path / "creds", tmp_path / "out"
    cred(creds, "svc", fake.url)
    args = (
        "once",
        "--credentials-dir",
        str(creds),
        "--output-dir",
        str(out),
        "--state-dir",
        str(tmp_path / "state"),
        "--log-format",
        "json",
    )
    r = imsd(*args, env={"CLI_SECRET": SECRET})
    assert r.returncode == 0, r.stderr
    token = (out / "svc" / "token").read_text()
    assert fake.state.validate_token(token) is not None
    assert token not in r.stderr
    assert SECRET not in r.stderr
    r = imsd(*args, env={"CLI_SECRET": "p8e-wrong-000000000000000000"})
    assert r.returncode == 1
    assert "invalid_client" in r.stderr


ALL_COMMON = {
    "--config",
    "--credentials-dir",
    "--output-dir",
    "--state-dir",
    "--socket",
    "--metrics-address",
    "--ims-url",
    "--log-format",
    "--log-level",
}
DIRS = {"--credentials-dir", "--output-dir", "--state-dir"}
LOGS = {"--log-format", "--log-level"}

# (command, the common options its --help lists: only those it uses)
HELP: list[tuple[list[str], set[str]]] = [
    (["run"], ALL_COMMON),
    (["check"], ALL_COMMON),
    (["once"], {"--config", "--ims-url", *DIRS, *LOGS}),
    (["demo"], ALL_COMMON - {"--ims-url"}),
    (["import", "x.json"], {"--config", "--credentials-dir", *LOGS}),
    (["plugins"], {"--config", *LOGS}),
    (["status"], {"--config", "--socket"}),
    (["token", "x"], {"--config", "--socket"}),
    (["headers", "x"], {"--config", "--socket"}),
    (["exec", "x"], {"--config", "--output-dir", "--socket", *LOGS}),
]

#: Options that have no default to show (repeatable, or nothing unless given).
NO_DEFAULT = {"--signal", "--private-key", "--option", "--help", "--restart", "--no-token-env"}


def _entries(text: str) -> dict[str, str]:
    """--help's option entries: the first long option of each, and its whole text."""
    out: dict[str, str] = {}
    for entry in re.split(r"\n(?=  -)", text):
        if m := re.match(r"\s+(?:-\w[ ,]+)?(--[a-z-]+)", entry):
            out[m.group(1)] = " ".join(entry.split())
    return out


@pytest.mark.parametrize(("argv", "shown"), HELP, ids=[h[0][0] for h in HELP])
def test_help_lists_the_options_a_command_uses_with_defaults(
    argv: list[str], shown: set[str]
) -> None:
    """Each --help lists the common options that command uses, no others; every option that
    takes a value shows its default; NAME is described."""
    r = imsd(argv[0], "--help")
    assert r.returncode == 0, r.stderr
    entries = _entries(r.stdout)
    assert set(entries) & ALL_COMMON == shown
    for option, text in entries.items():
        takes_value = re.match(r"--[a-z-]+ [A-Z{]", text) is not None
        if takes_value and option not in NO_DEFAULT:
            assert "default" in text, f"{argv[0]} {option}: no default shown: {text}"
    if "name" in r.stdout.split("options:")[0]:
        assert "credential name" in r.stdout, r.stdout


def test_once_help_shows_the_timeout_default() -> None:
    r = imsd("once", "--help")
    assert "seconds (default: 60)" in " ".join(r.stdout.split())
    assert "--allow-empty" in r.stdout


@pytest.mark.parametrize(("argv", "shown"), HELP, ids=[h[0][0] for h in HELP])
def test_options_a_command_does_not_use_are_still_accepted(
    argv: list[str], shown: set[str]
) -> None:
    """Hidden, not removed: scripts that pass one set of options to every command go on
    working (argparse would exit 2 with 'unrecognized arguments')."""
    from imsd.cli import build_parser

    extra = ["--metrics-address", "", "--ims-url", "https://ims-na1.adobelogin.com"]
    extra += ["--output-dir", "o", "--state-dir", "s", "--credentials-dir", "c"]
    extra += ["--socket", "x.sock", "--log-level", "info", "--log-format", "json"]
    args = build_parser().parse_args([*argv, *extra])
    assert args.output_dir == Path("o")
    assert args.metrics_address == ""


def test_once_on_an_empty_directory_exits_1_unless_allowed(tmp_path: Path) -> None:
    args = ["once", "--credentials-dir", str(tmp_path / "creds")]
    args += ["--output-dir", str(tmp_path / "out"), "--state-dir", str(tmp_path / "state")]
    (tmp_path / "creds").mkdir()
    r = imsd(*args, "--log-format", "json", env={"IMSD_CONFIG": ""})
    assert r.returncode == 1, r.stderr
    assert "once.empty" in r.stderr
    r = imsd(*args, "--allow-empty", env={"IMSD_CONFIG": ""})
    assert r.returncode == 0, r.stderr


def _json_events(stderr: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def test_once_without_output_dir_refuses_a_missing_default(tmp_path: Path) -> None:
    """An init container that forgot IMSD_OUTPUT_DIR must fail, not write the tokens into
    its own filesystem: a default directory that does not exist is not created."""
    for default in ("/run/imsd/tokens", "/var/lib/imsd"):
        if Path(default).exists():
            pytest.skip(f"{default} exists on this machine")
    (tmp_path / "creds").mkdir()
    env = {"IMSD_CONFIG": ""}
    base = ["once", "--credentials-dir", str(tmp_path / "creds"), "--allow-empty"]
    r = imsd(*base, "--state-dir", str(tmp_path / "state"), env=env, clean=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("imsd: output_dir is not set and its default does not exist ")
    assert "(/run/imsd/tokens): pass --output-dir" in r.stderr
    r = imsd(*base, "--output-dir", str(tmp_path / "out"), env=env, clean=True)
    assert r.returncode == 2, r.stderr
    assert "state_dir is not set" in r.stderr
    assert "--state-dir" in r.stderr
    assert not Path("/run/imsd/tokens").exists()
    assert not Path("/var/lib/imsd").exists()


def test_once_names_the_directories_it_creates(tmp_path: Path) -> None:
    out, state = tmp_path / "new" / "out", tmp_path / "state"
    r = imsd(
        *("once", "--credentials-dir", str(tmp_path), "--allow-empty", "--log-format", "json"),
        *("--output-dir", str(out), "--state-dir", str(state)),
        env={"IMSD_CONFIG": ""},
    )
    assert r.returncode == 0, r.stderr
    created = [
        (e["setting"], e["path"])
        for e in _json_events(r.stderr)
        if e["event"] == "once.created_directory"
    ]
    assert created == [
        ("output_dir", str(tmp_path / "new")),
        ("output_dir", str(out)),
        ("state_dir", str(state)),
    ]
    assert out.is_dir()
    assert state.stat().st_mode & 0o777 == 0o700
    r = imsd(
        *("once", "--credentials-dir", str(tmp_path), "--allow-empty", "--log-format", "json"),
        *("--output-dir", str(out), "--state-dir", str(state)),
        env={"IMSD_CONFIG": ""},
    )
    assert "once.created_directory" not in r.stderr  # nothing new: nothing said


def test_once_logs_an_invalid_file_once_and_no_retry_it_will_not_make(
    tmp_path: Path, fake: FakeIms
) -> None:
    """One line for an invalid file (not three), and a permanent failure without retry_in:
    imsd once never retries it."""
    creds = tmp_path / "creds"
    cred(creds, "refused", fake.url)
    (creds / "broken.toml").write_text('auth = "oauth_server_to_server"\n')
    r = imsd(
        *("once", "--credentials-dir", str(creds), "--log-format", "json"),
        *("--output-dir", str(tmp_path / "out"), "--state-dir", str(tmp_path / "state")),
        env={"IMSD_CONFIG": "", "CLI_SECRET": "p8e-wrong-000000000000000000"},
    )
    assert r.returncode == 1, r.stderr
    events = _json_events(r.stderr)
    broken = [e for e in events if "broken" in json.dumps(e)]
    assert [e["event"] for e in broken] == ["credential.invalid"], broken
    failures = [e for e in events if e["event"] == "token.refresh_failed"]
    assert failures, r.stderr
    assert all("retry_in" not in e for e in failures), failures
    done = [e for e in events if e["event"] == "once.done"]
    assert done == [{**done[0], "written": 0, "failed": 1, "invalid_files": 1}], done


def test_config_error_names_source(tmp_path: Path) -> None:
    config = tmp_path / "imsd.toml"
    config.write_text("refresh_fraction = 2\nbogus = 1\n")
    r = imsd("check", "--config", str(config))
    assert r.returncode == 2
    assert str(config) in r.stderr
    assert "refresh_fraction" in r.stderr


def test_demo_prints_a_working_curl_line() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "imsd", "demo", "--log-format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines: queue.Queue[str] = queue.Queue()
        stdout = proc.stdout

        def pump() -> None:
            for line in stdout:
                lines.put(line)

        threading.Thread(target=pump, daemon=True).start()
        seen: list[str] = []
        while not any("try:" in line for line in seen):
            seen.append(lines.get(timeout=60))
        curl = next(line for line in seen if "try:" in line).split("try:", 1)[1].strip()
        demo_dir = Path(curl.split("@", 1)[1].split()[0]).parents[2]
        assert re.fullmatch(r"curl -sS -H @\S+/generic\.headers http://127\.0\.0\.1:\d+/\S+", curl)
        r = subprocess.run(
            [*curl.split(), "--fail-with-body"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(r.stdout)["ok"] is True
        # The status line runs as printed: this imsd, not whatever "imsd" PATH holds (none
        # after make demo). Here it was started as python -m imsd.
        status = next(line for line in seen if "socket:" in line).split("socket:", 1)[1]
        assert status.split()[:3] == [sys.executable, "-m", "imsd"], status
        r = subprocess.run(status.split(), capture_output=True, text=True, timeout=30, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert re.search(r"^demo\s+valid", r.stdout, re.MULTILINE), r.stdout
        # The proxy, the template and the Python client lines run as printed too (README:
        # "Proxy", "Templates", "Using the tokens").
        while not any("python:" in line for line in seen):
            seen.append(lines.get(timeout=60))
        printed = {
            key: next(line for line in seen if f"{key}:" in line).split(f"{key}:", 1)[1].strip()
            for key in ("proxy", "netrc", "python")
        }
        r = subprocess.run(
            [*printed["proxy"].split(), "--fail-with-body"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(r.stdout) | {"x-sandbox-name": "dev"} == json.loads(r.stdout)
        token = (demo_dir / "tokens" / "demo" / "token").read_text().strip()
        netrc = Path(printed["netrc"].split()[1]).read_text()
        assert netrc.endswith(f" login demo-client password {token}\n"), "netrc as templated"
        r = subprocess.run(
            shlex.split(printed["python"]), capture_output=True, text=True, timeout=60, check=False
        )
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["ok"] is True
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert demo_dir.name.startswith("imsd-demo-")
    assert not demo_dir.exists()  # its secret, state and tokens went with it


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("alpha", "alpha"),
        ("\x1b[2J\x1b]0;pwned\x07x", "\\x1b[2J\\x1b]0;pwned\\x07x"),
        ("a\nb\rc\td", "a\\nb\\rc\\td"),
        ("caf\u00e9 \u2192 ok", "caf\u00e9 \u2192 ok"),
    ],
)
def test_status_never_prints_control_characters(raw: str, shown: str) -> None:
    from imsd.cli import printable

    assert printable(raw) == shown
    assert all(c.isprintable() for c in printable(raw))


# -- user mistakes: one line, exit 2 -----------------------------------------------------------

# (id, argv, config file text or None, env, what the line must name). Paths are relative to
# the case's directory: "occupied.sock" has a live listener, "afile" is a regular file,
# "cfgdir" a directory; {port} is a TCP port something else listens on.
MISTAKES: list[tuple[str, list[str], str | None, dict[str, str], str]] = [
    ("check-log-level", ["check"], 'log_level = "verbose"\n', {}, "log_level"),
    ("run-log-level", ["run"], 'log_level = "verbose"\n', {}, "log_level"),
    ("check-log-format", ["check"], 'log_format = "text"\n', {}, "log_format"),
    ("run-log-format", ["run"], 'log_format = "text"\n', {}, "log_format"),
    ("check-metrics-host", ["check"], 'metrics_address = "localhost"\n', {}, "metrics_address"),
    ("run-metrics-host", ["run"], 'metrics_address = "localhost"\n', {}, "metrics_address"),
    ("check-metrics-port", ["check"], 'metrics_address = "127.0.0.1:70000"\n', {}, "70000"),
    ("run-port-in-use", ["run", "--metrics-address", "127.0.0.1:{port}"], "", {}, ":{port}"),
    ("demo-port-in-use", ["demo", "--metrics-address", "127.0.0.1:{port}"], "", {}, ":{port}"),
    ("run-socket-in-use", ["run", "--socket", "occupied.sock"], "", {}, "occupied.sock"),
    ("run-socket-not-socket", ["run", "--socket", "afile"], "", {}, "afile"),
    ("run-socket-dir", ["run", "--socket", "afile/sub/imsd.sock"], "", {}, "afile/sub"),
    ("run-output-dir", ["run", "--output-dir", "afile/tokens"], "", {}, "afile/tokens"),
    ("once-output-dir", ["once", "--output-dir", "afile/tokens"], "", {}, "afile/tokens"),
    ("run-state-dir", ["run", "--state-dir", "afile/state"], "", {}, "afile/state"),
    ("run-creds-is-file", ["run", "--credentials-dir", "afile"], "", {}, "afile"),
    ("check-output-dir", ["check", "--output-dir", "afile/tokens"], "", {}, "afile/tokens"),
    ("check-state-dir", ["check", "--state-dir", "afile/state"], "", {}, "afile/state"),
    ("check-socket-dir", ["check", "--socket", "afile/imsd.sock"], "", {}, "afile"),
    ("check-creds-is-file", ["check", "--credentials-dir", "afile"], "", {}, "afile"),
    ("check-creds-missing", ["check", "--credentials-dir", "nope"], "", {}, "nope"),
    # run refuses what check refuses (it used to start and log root_unavailable every minute)
    ("run-creds-missing", ["run", "--credentials-dir", "nope"], "", {}, "not found (nope)"),
    ("once-creds-missing", ["once", "--credentials-dir", "nope"], "", {}, "not found (nope)"),
    ("config-is-dir", ["check", "--config", "cfgdir"], None, {}, "cfgdir"),
    ("config-missing", ["run", "--config", "missing.toml"], None, {}, "missing.toml"),
    ("env-config-missing", ["check"], None, {"IMSD_CONFIG": "gone.toml"}, "gone.toml"),
    ("config-bad-toml", ["check"], "file_mode = 0640\n", {}, "imsd.toml"),
    ("config-unknown-key", ["check"], 'log_levle = "info"\n', {}, "log_levle"),
    ("config-wrong-type", ["run"], 'max_connections = "many"\n', {}, "max_connections"),
    ("config-bad-mode", ["check"], 'file_mode = "rw"\n', {}, "file_mode"),
    ("config-no-group", ["run"], 'file_group = "no-such-group-imsd"\n', {}, "file_group"),
    ("config-backoff", ["check"], "backoff_initial = 500.0\n", {}, "backoff_initial"),
    ("config-http-ims", ["check"], 'ims_url = "http://ims.example.com"\n', {}, "ims_url"),
    ("env-log-level", ["check"], "", {"IMSD_LOG_LEVEL": "verbose"}, "IMSD_LOG_LEVEL"),
    ("env-connections", ["run"], "", {"IMSD_MAX_CONNECTIONS": "lots"}, "IMSD_MAX_CONNECTIONS"),
    ("env-file-mode", ["once"], "", {"IMSD_FILE_MODE": "999"}, "IMSD_FILE_MODE"),
    ("env-metrics", ["run"], "", {"IMSD_METRICS_ADDRESS": "nohost"}, "IMSD_METRICS_ADDRESS"),
    ("env-uids", ["run"], "", {"IMSD_ALLOWED_UIDS": "root"}, "IMSD_ALLOWED_UIDS"),
    ("flag-metrics", ["check", "--metrics-address", "localhost"], "", {}, "--metrics-address"),
    ("flag-log-level", ["run", "--log-level", "verbose"], "", {}, "--log-level"),
    ("flag-log-format", ["check", "--log-format", "text"], "", {}, "--log-format"),
    ("flag-unknown", ["run", "--bogus"], "", {}, "--bogus"),
    ("token-config", ["token", "x"], 'log_level = "verbose"\n', {}, "log_level"),
    ("headers-env", ["headers", "x"], "", {"IMSD_SOCKET_MODE": "rw"}, "IMSD_SOCKET_MODE"),
    ("status-config", ["status"], "socket_mode = 4096\n", {}, "socket_mode"),
    ("exec-config", ["exec", "x", "--", "true"], 'log_format = "text"\n', {}, "log_format"),
    ("import-config", ["import", "dl.json"], 'log_level = "loud"\n', {}, "log_level"),
    ("import-option", ["import", "dl.json", "--option", "sandbox"], "", {}, "--option"),
    ("exec-no-dashes", ["exec", "x", "ls", "-l"], "", {}, "(ls -l): put -- before the command"),
    ("exec-cmd-help", ["exec", "x", "env", "--help"], "", {}, "imsd exec x -- env --help"),
    ("exec-no-command", ["exec", "x"], "", {}, "no command given (imsd exec)"),
    ("exec-bad-signal", ["exec", "x", "--signal", "NOPE", "--", "true"], "", {}, "(--signal)"),
    ("demo-config", ["demo"], 'log_format = "text"\n', {}, "log_format"),
]


Case = tuple[str, list[str], str | None, dict[str, str], str]


def _mistake(case: Case, root: Path, port: int) -> tuple[subprocess.CompletedProcess[str], str]:
    name, argv, config, env, needle = case
    here = root / name
    for d in ("creds", "cfgdir"):
        (here / d).mkdir(parents=True)
    (here / "afile").write_text("not a directory\n")
    if config is not None:
        (here / "imsd.toml").write_text(config)
    base = {  # nothing outside the case's directory; relative paths are relative to it
        "IMSD_CONFIG": "imsd.toml" if config is not None else "",
        "IMSD_CREDENTIALS_DIR": "creds",
        "IMSD_OUTPUT_DIR": "out",
        "IMSD_STATE_DIR": "state",
        "IMSD_SOCKET": "imsd.sock",
        "IMSD_METRICS_ADDRESS": "127.0.0.1:0",
    }
    with contextlib.ExitStack() as stack:
        if "occupied.sock" in argv:
            live = stack.enter_context(socket.socket(socket.AF_UNIX))
            live.bind(str(here / "occupied.sock"))
            live.listen()
        args = [sys.executable, "-m", "imsd", *(a.replace("{port}", str(port)) for a in argv)]
        try:
            r = subprocess.run(
                args,
                capture_output=True,
                text=True,
                timeout=30,
                cwd=here,
                env={**os.environ, **base, **env},
                check=False,
            )
        except subprocess.TimeoutExpired as e:  # it started instead of refusing: killed
            r = subprocess.CompletedProcess(args, -9, "", str(e.stderr))
    return r, needle.replace("{port}", str(port))


def test_user_mistakes_are_one_line_and_exit_2(tmp_path: Path) -> None:
    """Every configuration, startup and environment mistake: one line naming the key or path,
    exit status 2, no traceback (README "Running it")."""
    with socket.socket() as busy:  # the "port already in use"
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(lambda c: _mistake(c, tmp_path, port), MISTAKES))
    wrong = []
    for (name, argv, *_), (r, needle) in zip(MISTAKES, results, strict=True):
        lines = r.stderr.rstrip("\n").split("\n")
        if (
            r.returncode != 2
            or len(lines) != 1
            or not lines[0].startswith("imsd: ")
            or "Traceback" in r.stderr
            or needle not in lines[0]
        ):
            wrong.append(f"{name} {argv}: exit {r.returncode}, wanted {needle!r}:\n{r.stderr}")
    assert not wrong, "\n".join(wrong)
    assert len(MISTAKES) >= 30


def test_check_warns_of_an_empty_directory_and_a_busy_socket(tmp_path: Path) -> None:
    """ "ok" for a directory without credentials would hide a wrong path; a listener in use
    is only a warning (check runs beside the daemon), both fail with --strict."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "notes.txt").write_text("not a credential\n")
    env = {
        "IMSD_CONFIG": "",
        "IMSD_OUTPUT_DIR": str(tmp_path / "out"),
        "IMSD_STATE_DIR": str(tmp_path / "state"),
        "IMSD_SOCKET": str(tmp_path / "imsd.sock"),
        "IMSD_METRICS_ADDRESS": "127.0.0.1:0",
    }
    r = imsd("check", "--credentials-dir", str(creds), env=env)
    assert r.returncode == 0, r.stderr
    assert "ok: " in r.stdout
    assert "(0 credentials)" in r.stdout
    assert r.stderr.startswith("imsd: warning: no credentials")
    assert "1 file(s)" in r.stderr
    assert imsd("check", "--strict", "--credentials-dir", str(creds), env=env).returncode == 1
    cred(creds, "one", "https://ims.example.com")
    secret = {"CLI_SECRET": SECRET}
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(env["IMSD_SOCKET"])
        live.listen()
        r = imsd("check", "--credentials-dir", str(creds), env=env | secret)
        assert r.returncode == 0, r.stderr
        assert "(1 credential)" in r.stdout
        assert "imsd: warning: another process is listening" in r.stderr
        strict = imsd("check", "--strict", "--credentials-dir", str(creds), env=env | secret)
        assert strict.returncode == 1, strict.stderr


def test_demo_names_the_imsd_it_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After make demo, imsd is .venv/bin/imsd, not on PATH: the demo prints that path."""
    from imsd.cli import _self_command

    script = tmp_path / "venv" / "bin" / "imsd"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(sys, "argv", [str(script.relative_to(tmp_path))])
    monkeypatch.chdir(tmp_path)
    assert _self_command() == str(script)
    monkeypatch.setenv("PATH", str(script.parent))
    assert _self_command() == "imsd"  # what PATH finds is this very imsd


def test_readme_python_snippets_import_what_they_use() -> None:
    """README "Using the tokens": every name the client snippet uses is imported (or a
    builtin), and every module it imports is installed with imsd (no requests)."""
    import ast
    import builtins
    import importlib

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    python = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
    blocks = [b for b in python if "imsd.client" in b]
    assert blocks
    for block in blocks:
        tree = ast.parse(block)
        imported: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for alias in node.names:
                    imported.add(alias.asname or alias.name.split(".")[0])
                    module = node.module if isinstance(node, ast.ImportFrom) else alias.name
                    importlib.import_module(module or alias.name)
        assigned = {
            n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
        }
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        missing = used - imported - assigned - set(dir(builtins))
        assert not missing, f"{sorted(missing)} not imported in:\n{block}"


def test_status_shows_pending_for_a_credential_that_never_had_a_token() -> None:
    """The daemon's state is ``expired`` (no usable token: what alerts and clients go by);
    imsd status words it ``pending`` when there never was a token, the error beside it."""
    from imsd.cli import _shown_state

    never = {"state": "expired", "expires_at": None, "last_error": "invalid_client"}
    assert _shown_state(never) == "pending"
    lapsed = {"state": "expired", "expires_at": "2026-01-01T00:00:00Z", "last_error": "x"}
    assert _shown_state(lapsed) == "expired"
    assert _shown_state({"state": "valid", "expires_at": "2026-01-01T00:00:00Z"}) == "valid"
    assert _shown_state({"state": "invalid", "expires_at": None}) == "invalid"


def _exact(r: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.startswith(("imsd:", "creds/"))]


def test_first_hour_mistakes_get_the_line_that_names_the_fix(tmp_path: Path) -> None:
    """Issue 26's table, made through the real CLI, each line as printed."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "a.secret").write_text(SECRET + "\n")
    (creds / "a.toml").write_text(
        'auth = "oauth_server_to_server"\nclient_id = "c"\nclient_secert_file = "a.secret"\n'
        f'org_id = "{ORG}"\nscopes = ["openid"]\n'
    )
    common = ["--credentials-dir", "creds", "--output-dir", "out", "--state-dir", "st"]
    common += ["--socket", "s.sock", "--metrics-address", ""]
    env = {"IMSD_CONFIG": ""}

    def run(
        *args: str, extra: dict[str, str] | None = None, pre: str = ""
    ) -> subprocess.CompletedProcess[str]:
        code = f"import sys; {pre}from imsd.cli import main; sys.exit(main())"
        return subprocess.run(
            [sys.executable, "-c", code, *args, *common],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("IMSD_")},
                **env,
                **(extra or {}),
            },
            check=False,
        )

    r = run("check")
    assert _exact(r) == [
        "creds/a.toml: client_secert_file: unknown key 'client_secert_file': "
        "did you mean 'client_secret_file'?"
    ]
    (creds / "a.toml").write_text(
        'auth = "oauth_server_to_server"\nclient_id = "c"\nclient_secret_file = "a.secret"\n'
        'org_id = "nope"\nscopes = ["openid"]\n'
    )
    r = run("check")
    assert _exact(r) == ["creds/a.toml: org_id: must be an IMS org id ending with @AdobeOrg"]
    (creds / "a.toml").write_text(
        'auth = "oauth_server_to_server"\nclient_id = "c"\nclient_secret_file = "a.secret"\n'
        f'org_id = "{ORG}"\nscopes = ["openid"]\n'
    )
    r = run("check", extra={"IMSD_OUTPT_DIR": "x"})
    assert r.returncode == 0, r.stderr
    assert _exact(r) == [
        "imsd: warning: unknown environment variable IMSD_OUTPT_DIR (ignored): "
        "did you mean IMSD_OUTPUT_DIR?"
    ]
    # Fleet mode without its extra: one line, exit 2, from check and from run alike.
    for command in ("check", "run"):
        r = run(
            command,
            extra={"IMSD_COORDINATION": "redis://127.0.0.1:1"},
            pre="sys.modules['coredis'] = None; ",
        )
        assert r.returncode == 2, r.stderr
        assert _exact(r) == [
            "imsd: coordination is set but fleet mode is not installed (no coredis): "
            "pip install 'imsd[fleet]', or unset coordination"
        ]
