"""The ``imsd`` command line (argparse). No secret is ever accepted on argv."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import anyio
import structlog

from imsd import __version__, logs
from imsd.config import ConfigError, Settings, load_settings, unknown_env
from imsd.registry import Registry, load_registry, scope_hints

__all__ = ["main"]

log = structlog.get_logger("imsd.cli")

#: Help, metavar and the setting of each common option; its default is the setting's.
_OPTIONS: dict[str, tuple[str, str | None]] = {
    "credentials_dir": ("directory of credential files", "DIR"),
    "output_dir": ("where token files are written", "DIR"),
    "state_dir": ("persistent state (tokens across restarts, rotated refresh tokens)", "DIR"),
    "socket": ("Unix socket of the daemon's API", "PATH"),
    "metrics_address": ("metrics/health listener; empty disables", "HOST:PORT"),
    "ims_url": ("IMS host for credentials that name none", "URL"),
    "log_format": ("format (default: journald under systemd, console on a tty, else json)", None),
    "log_level": ("log level", None),
}

#: The common options each command uses and lists in its --help. The others are still
#: accepted (scripts pass one set of options to every command) but hidden: they do nothing.
_USES: dict[str, tuple[str, ...]] = {
    "run": tuple(_OPTIONS),
    "check": tuple(_OPTIONS),
    "once": ("credentials_dir", "output_dir", "state_dir", "ims_url", "log_format", "log_level"),
    "demo": tuple(k for k in _OPTIONS if k != "ims_url"),
    "import": ("credentials_dir", "log_format", "log_level"),
    "plugins": ("log_format", "log_level"),
    "login": ("credentials_dir", "state_dir", "ims_url", "log_format", "log_level"),
    "status": ("socket",),
    "token": ("socket",),
    "headers": ("socket",),
    "exec": ("output_dir", "socket", "log_format", "log_level"),
}

_NAME_HELP = "credential name: its file's stem or name field (imsd status lists them)"


def _common(p: argparse.ArgumentParser, command: str) -> None:
    from imsd.config import DEFAULT_CONFIG

    g = p.add_argument_group("common options (flag > IMSD_* env > config file > default)")
    g.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"config file (default: $IMSD_CONFIG, else {DEFAULT_CONFIG.name} in "
        f"$CONFIGURATION_DIRECTORY under systemd or {DEFAULT_CONFIG}, if it exists)",
    )
    uses = _USES[command]
    for key, (text, metavar) in _OPTIONS.items():
        flag = "--" + key.replace("_", "-")
        default = Settings.model_fields[key].default
        shown = f"{text} (default: {default or 'none'}; env IMSD_{key.upper()})"
        if key == "log_format":
            shown = f"{text}; env IMSD_LOG_FORMAT"
        kwargs: dict[str, Any] = {
            "help": shown.replace("%", "%%") if key in uses else argparse.SUPPRESS
        }
        if key == "log_format":
            kwargs["choices"] = logs.FORMATS
        elif key == "log_level":
            kwargs["choices"] = ("debug", "info", "warning", "error")
        else:
            kwargs["metavar"] = metavar
        if key.endswith(("_dir", "socket")):
            kwargs["type"] = Path
        g.add_argument(flag, **kwargs)


class _Parser(argparse.ArgumentParser):
    """A usage error is one line like every other user mistake (argparse prints the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"imsd: {message} ({self.prog}): see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="imsd",
        description="Adobe IMS token daemon: obtains, refreshes and publishes "
        "access tokens for the credential files in a directory.",
    )
    parser.add_argument("--version", action="version", version=f"imsd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the daemon in the foreground")
    _common(p, "run")
    p = sub.add_parser("once", help="fetch every credential once, write outputs, exit")
    _common(p, "once")
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="give up retrying transient failures after this many seconds (default: %(default)g)",
    )
    p.add_argument(
        "--allow-empty",
        action="store_true",
        help="exit 0 when the credentials directory holds no credential (default: exit 1)",
    )
    p = sub.add_parser("check", help="validate config and credential files (no network)")
    _common(p, "check")
    p.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 on a warning too (no credentials found, a listen address in use)",
    )
    p = sub.add_parser("demo", help="run the daemon against the embedded fake IMS")
    _common(p, "demo")
    p.add_argument(
        "--token-lifetime",
        type=float,
        default=86400.0,
        metavar="SECONDS",
        help="lifetime of the fake IMS's tokens in seconds (default: %(default)g)",
    )
    p = sub.add_parser("fake-ims", help="run the fake IMS and API gateway alone")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default: %(default)s)")
    p.add_argument("--port", type=int, default=8765, help="listen port (default: %(default)s)")
    p.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="log level (default: %(default)s)",
    )
    p = sub.add_parser(
        "import",
        help="turn a Developer Console download (or an aepp, cjapy or aanalytics2 config "
        "file) into native credential files",
        description="Writes NAME.toml plus its secret in a separate 0600 file (NAME.secret) "
        "into the credentials directory (or --dir). The download itself holds the secret in "
        "clear: delete it afterwards.",
    )
    _common(p, "import")
    p.add_argument(
        "file", type=Path, help="the downloaded JSON file, or an aepp/cjapy/aanalytics2 config"
    )
    p.add_argument("--name", help="credential name (default: the file name's stem)")
    p.add_argument(
        "--product",
        action="append",
        metavar="PRODUCT",
        help="product whose headers to write (repeatable; default: generic); see imsd plugins",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="PRODUCT.KEY=VALUE",
        help="a product option (repeatable), e.g. --option analytics.company_id=acme",
    )
    p.add_argument(
        "--secret-index",
        type=int,
        default=0,
        help="which of CLIENT_SECRETS to use while two are active (default: %(default)s)",
    )
    p.add_argument("--private-key", metavar="PATH", help="JWT only: the private.key to sign with")
    p.add_argument(
        "--metascope",
        action="append",
        default=[],
        metavar="NAME",
        help="JWT only: a metascope (repeatable; default: those of --product)",
    )
    p.add_argument(
        "--dir", type=Path, metavar="DIR", help="where to write (default: the credentials dir)"
    )
    p.add_argument("--force", action="store_true", help="replace existing files")
    p = sub.add_parser("plugins", help="list loaded plugins, products and auth methods")
    _common(p, "plugins")
    p = sub.add_parser(
        "login",
        help="obtain a refresh_token credential's first refresh token (a user logs in)",
        description="Prints the IMS authorize URL for you to open, then takes the "
        "answer on a loopback listener (redirect_uri http://127.0.0.1:PORT/... or "
        "http://localhost:PORT/...) or as the pasted address, prints whose account it is, "
        "and writes the refresh token 0600 to refresh_token_file.",
    )
    _common(p, "login")
    p.add_argument("name", metavar="NAME", help=_NAME_HELP)
    p.add_argument(
        "--browser",
        action="store_true",
        help="also open a browser (handed a 0600 page, never the URL on its command line)",
    )
    p.add_argument(
        "--no-browser",
        dest="browser",
        action="store_false",
        help="only print the URL for you to open (the default)",
    )
    p.add_argument(
        "--expect-user",
        metavar="USER",
        help="refuse the login unless IMS says it is this account (IMS user id, e.g. "
        "ABC123@AdobeID, or its email when IMS gives one); imsd login prints it",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long to wait for the browser (default: %(default)g)",
    )
    p = sub.add_parser("status", help="credentials, states and expiry (from the daemon)")
    _common(p, "status")
    p = sub.add_parser("token", help="print a credential's access token (from the daemon)")
    _common(p, "token")
    p.add_argument("name", help=_NAME_HELP)
    p = sub.add_parser("headers", help="print a credential's request headers (from the daemon)")
    _common(p, "headers")
    p.add_argument("name", help=_NAME_HELP)
    p.add_argument("--product", help="product or instance (default: the credential's first)")
    p.add_argument(
        "--format",
        choices=("json", "curl", "env"),
        default="curl",
        help="json object, curl -H arguments' lines, or env lines (default: %(default)s)",
    )
    p = sub.add_parser(
        "exec",
        help="run CMD with a credential's token in its environment",
        usage="imsd exec [OPTIONS] NAME [OPTIONS] -- CMD [ARGS...]",
        description="Runs CMD with ADOBE_ACCESS_TOKEN, ADOBE_API_KEY, ADOBE_ORG_ID and the "
        "product's variables, read from the daemon's token files in output_dir or, when "
        "those have no usable token, from its socket API. --output-dir alone reads only the "
        "files, --socket alone asks only the socket. Put -- before CMD.",
    )
    _common(p, "exec")
    p.add_argument("name", help=_NAME_HELP)
    p.add_argument(
        "--product",
        help="product or instance whose env variables (default: the credential's first)",
    )
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--signal",
        dest="rotate_signal",
        metavar="SIG",
        help="on token rotation send CMD this signal (e.g. HUP)",
    )
    how.add_argument("--restart", action="store_true", help="on token rotation restart CMD")
    p.add_argument(
        "--no-token-env",
        dest="token_env",
        action="store_false",
        help="keep the token out of CMD's environment; CMD reads $IMSD_TOKEN_FILE",
    )
    p.add_argument("argv", nargs="*", metavar="-- CMD", help="the command to run and its arguments")
    return parser


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    overrides = {k: getattr(args, k, None) for k in _OPTIONS}
    overrides.update(extra)
    return load_settings(getattr(args, "config", None), overrides=overrides)


def _dir_problem(key: str, path: Path, *, access: bool = True) -> str | None:
    """Why directory *path* (setting *key*) could not be used or created, or None."""
    here = Path(os.path.abspath(path))
    while not here.exists() and here != here.parent:
        here = here.parent
    if not here.is_dir():
        return f"cannot create {key} ({path}): {here} is not a directory; choose another path"
    if access and not os.access(here, os.W_OK | os.X_OK):
        verb = "cannot write to" if here == Path(os.path.abspath(path)) else "cannot create"
        return f"{verb} {key} ({path}): {here} is not writable; fix its owner or mode"
    return None


def _preflight(settings: Settings, *, socket: bool, access: bool = True) -> str | None:
    """The first reason run/once would fail on a path, before anything starts: a state or
    output directory that cannot be made would otherwise only be logged, again and again."""
    creds = settings.credentials_dir
    if not creds.is_dir():  # a wrong path, not a bad credential: nothing would ever be served
        what = "is not a directory" if creds.exists() else "not found"
        return f"credentials_dir {what} ({creds}): create it or set credentials_dir"
    dirs = [("output_dir", settings.output_dir), ("state_dir", settings.state_dir)]
    if socket and not os.environ.get("LISTEN_FDS"):  # systemd's socket: not ours to create
        dirs.append(("socket directory", settings.socket.parent))
    problem = next((p for key, path in dirs if (p := _dir_problem(key, path, access=access))), None)
    return problem or (_fleet_problem(settings) if socket else None)


def _fleet_problem(settings: Settings) -> str | None:
    """Fleet mode's Redis client is an extra: without it the daemon would fail at start with
    an ImportError inside its task group."""
    if not settings.coordination:
        return None
    try:
        import coredis  # noqa: F401
    except ImportError:
        return (
            "coordination is set but fleet mode is not installed (no coredis): "
            "pip install 'imsd[fleet]', or unset coordination"
        )
    return None


def _unset_and_missing(settings: Settings) -> str | None:
    """``imsd once`` creates only directories it was told about: an init container that
    forgot IMSD_OUTPUT_DIR (or whose volume is mounted elsewhere) would otherwise write the
    tokens into its own discarded filesystem and succeed."""
    for key in ("output_dir", "state_dir"):
        path: Path = getattr(settings, key)
        if key not in settings.model_fields_set and not path.exists():
            return (
                f"{key} is not set and its default does not exist ({path}): pass "
                f"--{key.replace('_', '-')} (or IMSD_{key.upper()}, or {key} in the config), "
                f"or create {path}"
            )
    return None


def _listen_problem(settings: Settings, *, socket: bool) -> str | None:
    """Why a listener of run would fail (address in use or unparsable, a live or non-socket
    file at the socket path), found before anything starts and logs."""
    import socket as so
    import stat

    from imsd.daemon import parse_address

    path = settings.socket
    if socket and not os.environ.get("LISTEN_FDS") and os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return (
                f"not a socket, refusing to replace it ({path}): "
                "remove it or choose another socket path"
            )
        with so.socket(so.AF_UNIX, so.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            if probe.connect_ex(str(path)) == 0:
                return (
                    f"another process is listening on the socket ({path}): "
                    "stop it (imsd already running?) or choose another socket path"
                )
    if settings.metrics_address:
        host, port = parse_address(settings.metrics_address)
        try:
            so.create_server((host, port)).close()  # SO_REUSEADDR, as the daemon binds
        except OSError as e:
            return (
                f"cannot listen: {os.strerror(e.errno) if e.errno else e} "
                f"({settings.metrics_address}, metrics_address): "
                "stop the other process or choose another address"
            )
    return None


def _fail(message: str, code: int = 2) -> int:
    print(f"imsd: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before the daemon's own signal handling is in place
        return _fail("interrupted (before start completed): nothing to clean up", 130)
    except (ConfigError, OSError) as e:
        return _fail(_one_line(e))
    except BaseExceptionGroup as group:  # a startup failure inside the daemon's task group
        leaves = _leaves(group)
        if any(isinstance(e, KeyboardInterrupt) for e in leaves):
            return _fail("interrupted (before start completed): nothing to clean up", 130)
        if leaves and all(isinstance(e, ConfigError | OSError) for e in leaves):
            return _fail(_one_line(leaves[0]))
        raise  # a bug: its traceback is wanted


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


def _one_line(e: BaseException) -> str:
    """``<what> (<where>): <what to do>`` for a startup error; listener and config errors
    already read so, an OSError from elsewhere is given its path."""
    if isinstance(e, OSError) and e.filename is not None:
        what = (e.strerror or str(e)).lower()
        return f"{what} ({e.filename}): check the path and its permissions"
    if isinstance(e, OSError) and e.strerror and not e.strerror.startswith("/"):
        text = e.strerror
    else:
        text = str(e.strerror if isinstance(e, OSError) and e.strerror else e)
        path, sep, rest = text.partition(": ")  # SinkError and friends: "PATH: reason"
        if sep and path.startswith("/"):
            text = f"{rest.lower()} ({path}): check the path and its permissions"
    return " ".join(printable(text).split())  # one line whatever the message held


def _main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    command: list[str] | None = None
    if argv[:1] == ["exec"]:
        split = _split_exec(argv, _subparser(parser, "exec"))
        if isinstance(split, str):
            return _fail(split)
        argv, command = split
    args = parser.parse_args(argv)
    if command is not None:
        args.argv = command
    if args.command == "exec" and not args.argv:
        return _fail(
            "no command given (imsd exec): put it after --: "
            "imsd exec NAME [OPTIONS] -- CMD [ARGS...]"
        )
    try:
        if args.command == "fake-ims":
            logs.configure(args.log_level)
            from imsd.fakeims.server import run_fake_ims

            run_fake_ims(args.host, args.port)
            return 0
        for warning in unknown_env(os.environ):
            print(f"imsd: warning: {warning}", file=sys.stderr)
        if args.command == "demo":
            return _demo(args)
        settings = _settings(args)
    except ConfigError as e:
        return _fail(_one_line(e))
    if args.command in ("status", "token", "headers"):
        return _query(args, settings)
    if args.command == "exec":
        return _exec(args, settings)
    if args.command == "import":
        return _import(args, settings)
    logs.configure(settings.log_level, settings.log_format)
    registry = load_registry(plugin_dirs=settings.plugin_dirs)
    if args.command == "plugins":
        return _plugins(registry)
    if args.command == "login":
        from imsd.login import main as login

        return login(
            settings,
            registry,
            args.name,
            browser=args.browser,
            timeout=args.timeout,
            expect_user=args.expect_user,
        )
    if args.command == "check":
        return _check(settings, registry, strict=args.strict)
    if args.command == "once" and (
        problem := _unset_and_missing(settings) or _preflight(settings, socket=False)
    ):
        return _fail(problem)
    if args.command == "run" and (
        problem := _preflight(settings, socket=True) or _listen_problem(settings, socket=True)
    ):
        return _fail(problem)
    if args.command == "once":
        from imsd.daemon import run_once
        from imsd.sinks import make_dirs

        for key, mode in (("output_dir", 0o755), ("state_dir", 0o700)):  # the daemon's modes
            for created in make_dirs(getattr(settings, key), mode):
                log.info("once.created_directory", setting=key, path=str(created))
        return anyio.run(
            lambda: run_once(
                settings, registry, give_up_after=args.timeout, allow_empty=args.allow_empty
            )
        )
    if args.command == "run":
        from imsd.daemon import Daemon

        daemon = Daemon(settings, registry, reload=lambda: _settings(args))
        anyio.run(daemon.run)
        return 0
    raise AssertionError(args.command)  # argparse rejects unknown commands


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[name]
            return found
    raise AssertionError(name)


def _split_exec(
    argv: list[str], parser: argparse.ArgumentParser
) -> tuple[list[str], list[str] | None] | str:
    """exec's own arguments and CMD, or the one-line error. CMD is everything after ``--``;
    without ``--`` it starts at the first word after NAME, accepted only when none of its
    words looks like an option (``imsd exec aep ls -l``: whose is ``-l``?)."""
    import shlex

    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1 :]
    options = {o: a.nargs != 0 for a in parser._actions for o in a.option_strings}
    positionals = 0
    i = 1  # after "exec"
    while i < len(argv):
        word = argv[i]
        if word.startswith("-") and word != "-":
            known = [o for o in options if o == word] or [o for o in options if o.startswith(word)]
            if "=" not in word and len(known) == 1 and options[known[0]]:
                i += 1  # its value
        else:
            positionals += 1
            if positionals == 2:  # NAME, then CMD
                cmd = argv[i:]
                if any(w.startswith("-") for w in cmd[1:]):
                    fixed = shlex.join([*argv[:i], "--", *cmd])
                    return printable(
                        f"options after the command ({shlex.join(cmd)}): put -- before the "
                        f"command: imsd {fixed}"
                    )
                return argv[:i], cmd
        i += 1
    return argv, None


def printable(value: object) -> str:
    """*value* for a terminal: control characters (escape sequences from a hostile file
    name or IMS answer) shown as ``\\xNN`` instead of being interpreted."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _shown_state(row: dict[str, Any]) -> str:
    """The STATE column: a credential that never had a token is ``pending`` (its LAST ERROR
    says why), not ``expired``. The API and metrics keep ``expired`` for it (no usable
    token: alerts and clients must treat it so); only the table words it for a person."""
    if row.get("state") == "expired" and not row.get("expires_at"):
        return "pending"
    return str(row.get("state"))


def _fleet_role(info: object) -> tuple[str, str]:
    """(role, holder) as ``imsd status`` prints them, from a row's ``fleet`` field."""
    if not isinstance(info, dict):
        return "-", "-"
    return printable(str(info.get("role") or "-")), printable(str(info.get("holder") or "-"))


def _query(args: argparse.Namespace, settings: Settings) -> int:
    from imsd.client import ImsdUnavailable, request

    try:
        if args.command == "status":
            rows = request("GET", "/v1/credentials", socket=settings.socket)["credentials"]
            # Fleet mode: the rows say this node's role and which node holds the lease.
            fleet = any("fleet" in row for row in rows)
            roles = {row["name"]: _fleet_role(row.get("fleet")) for row in rows}
            width = max((len(r[1]) for r in roles.values()), default=0)
            extra = f"{'ROLE':<8} {'HOLDER':<{width}} " if fleet else ""
            print(f"{'NAME':<24} {'STATE':<8} {'EXPIRES':<21} {extra}LAST ERROR")
            for row in rows:
                role, holder = roles[row["name"]]
                extra = f"{role:<8} {holder:<{width}} " if fleet else ""
                print(
                    f"{printable(row['name']):<24} {printable(_shown_state(row)):<8} "
                    f"{printable(row['expires_at'] or '-'):<21} {extra}"
                    f"{printable(row['last_error'] or '')}"
                    + (f" (x-debug-id {printable(row['debug_id'])})" if row.get("debug_id") else "")
                )
            return 0
        if args.command == "token":
            doc = request("GET", f"/v1/credentials/{args.name}/token", socket=settings.socket)
            sys.stdout.write(doc["access_token"])
            if sys.stdout.isatty():
                sys.stdout.write("\n")
            return 0
        query = f"?product={args.product}" if args.product else ""
        doc = request("GET", f"/v1/credentials/{args.name}/headers{query}", socket=settings.socket)
    except ImsdUnavailable as e:
        return _fail(str(e), 1)
    hdrs: dict[str, str] = doc["headers"]
    if args.format == "json":
        print(json.dumps(hdrs, indent=2))
    elif args.format == "curl":
        print("\n".join(f"{k}: {v}" for k, v in hdrs.items()))
    else:
        print("\n".join(f"{k}={v}" for k, v in doc["env"].items()))
    return 0


def _exec(args: argparse.Namespace, settings: Settings) -> int:
    import signal

    from imsd.execmode import ExecError, run_exec

    command = list(args.argv)
    sig = None
    if args.rotate_signal:
        name = args.rotate_signal.upper()
        try:
            sig = signal.Signals[name if name.startswith("SIG") else "SIG" + name]
        except KeyError:
            return _fail(
                f"unknown signal {printable(repr(args.rotate_signal))} (--signal): "
                "name one such as HUP, USR1 or TERM"
            )
    logs.configure(settings.log_level, settings.log_format)
    # Files, then the socket; naming one of them on the command line means only that one.
    only_socket = args.socket is not None and args.output_dir is None
    only_files = args.output_dir is not None and args.socket is None
    try:
        return anyio.run(
            lambda: run_exec(
                args.name,
                command,
                output_dir=settings.output_dir,
                files=not only_socket,
                socket=None if only_files else settings.socket,
                product=args.product,
                rotate_signal=sig,
                restart=args.restart,
                token_env=args.token_env,
            )
        )
    except ExecError as e:
        return _fail(str(e), 1)


def _import(args: argparse.Namespace, settings: Settings) -> int:
    """Validate everything (the download, the products and their options, against the loaded
    plugins) before writing anything."""
    from imsd.importer import (
        DIRECTORY_MODE,
        ImportFailed,
        check_plan,
        login_needed,
        parse_options,
        plan_import,
        write_import,
    )

    directory: Path = args.dir or settings.credentials_dir
    logs.configure(settings.log_level, settings.log_format)
    registry = load_registry(plugin_dirs=settings.plugin_dirs)
    try:
        options = parse_options(args.option)
        data = args.file.read_bytes()
        files = plan_import(
            data,
            source=str(args.file),
            name=args.name,
            product=args.product,
            secret_index=args.secret_index,
            private_key_file=str(Path(args.private_key).resolve()) if args.private_key else None,
            options=options,
            metascopes=args.metascope,
        )
        hints = check_plan(
            directory,
            files,
            products=registry.products,
            auth_methods=registry.auth_methods,
            secret_roots=settings.secret_root_paths(os.environ),
        )
        created = write_import(directory, files, force=args.force)
    except OSError as e:
        return _fail(f"{e.filename or args.file}: {e.strerror or e}", 1)
    except ImportFailed as e:
        return _fail(str(e), 2 if e.usage else 1)
    if created:
        print(f"created {directory} ({DIRECTORY_MODE:04o})")
    for f in files:
        print(f"wrote {directory / f.name} ({f.mode:04o})")
    if args.file.resolve().parent == directory.resolve():
        print(f"note: {args.file} is in the credentials dir too; remove it (it holds the secret)")
    for name in login_needed(files):
        print(f"next: imsd login {name} (a user's consent gives its first refresh token)")
    for hint in hints:
        print(f"note: {hint}")
    return 0


def _plugins(registry: Registry) -> int:
    for info in registry.plugins:
        provides = [*info.products, *(f"auth:{a}" for a in info.auth_methods)]
        status = "error: " + info.error if info.error else ", ".join(provides) or "-"
        print(f"{info.name:<16} {info.version:<10} {info.source:<40} {status}")
    return 1 if registry.errors else 0


def _check(settings: Settings, registry: Registry, *, strict: bool) -> int:
    """Exit 2 for what run would refuse at start (as run does), 1 for invalid credential
    files, else 0; warnings (nothing to serve, a listener in use, a directory this user cannot
    write) exit 1 only with --strict."""
    from imsd.catalog import Added
    from imsd.daemon import _initial_events, check

    creds = settings.credentials_dir
    if problem := _preflight(settings, socket=True, access=False):
        return _fail(problem)
    warnings: list[str] = []
    if denied := _preflight(settings, socket=True):  # check may run as another user than run
        warnings.append(denied + " (for the user running check)")
    try:
        # In use is only a warning: check is run beside the daemon that holds them.
        if busy := _listen_problem(settings, socket=True):
            warnings.append(busy + " (fine if it is this imsd, running)")
    except ConfigError as e:
        return _fail(_one_line(e))
    problems = check(settings, registry)
    for problem in problems:
        print(problem, file=sys.stderr)
    events = _initial_events(settings, registry)
    found = sum(isinstance(e, Added) for e in events)
    for event in events:  # a hint, whatever --strict: only the Console knows the scopes
        if isinstance(event, Added):
            for hint in scope_hints(event.cred, registry.products):
                print(f"note: {hint}")
    if not found and not problems:  # "ok" for an empty directory would hide a wrong path
        files = sum(1 for p in creds.iterdir() if not p.is_dir())
        warnings.append(
            f"no credentials ({creds}): {files} file(s) there, none a credential file "
            "(*.toml or *.json, not hidden); is this the right directory?"
        )
    for warning in warnings:
        print(f"imsd: warning: {warning}", file=sys.stderr)
    if not problems:
        print(f"ok: {creds} ({found} credential{'' if found == 1 else 's'})")
    return 1 if problems or (strict and warnings) else 0


# -- demo ---------------------------------------------------------------------------------------

DEMO_ORG = "0123456789ABCDEF01234567@AdobeOrg"
DEMO_SCOPES = (
    "openid",
    "AdobeID",
    "read_organizations",
    "additional_info.projectedProductContext",
    "session",
)


def _self_command() -> str:
    """How to run this very imsd again: ``imsd`` only when that is what PATH finds (after
    ``make demo`` it is usually not: ``.venv/bin/imsd``), else its path or ``python -m``."""
    import shlex

    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "imsd"
    if Path(argv0).name == "__main__.py":  # python -m imsd
        return f"{shlex.quote(sys.executable)} -m imsd"
    me = Path(argv0).resolve() if os.sep in argv0 else None
    found = shutil.which("imsd")
    if found and (me is None or Path(found).resolve() == me):
        return "imsd"
    return shlex.quote(str(me or argv0))


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _demo(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="imsd-demo-"))
    try:  # the directory holds a secret, a state file and tokens: gone when the demo stops
        return _run_demo(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run_demo(args: argparse.Namespace, root: Path) -> int:
    import shlex

    from imsd import tomlfile
    from imsd.config import ProxySpec
    from imsd.daemon import Daemon
    from imsd.fakeims.server import FakeIms

    creds, out, state = root / "credentials", root / "tokens", root / "state"
    for d in (creds, out, state):
        d.mkdir(mode=0o700)
    settings = _settings(
        args,
        credentials_dir=args.credentials_dir or creds,
        output_dir=args.output_dir or out,
        state_dir=args.state_dir or state,
        socket=args.socket or root / "imsd.sock",
        metrics_address=args.metrics_address or "127.0.0.1:0",
        # The authenticating proxy (README "Proxy") to the demo's aep instance.
        proxy=[ProxySpec(listen="127.0.0.1:0", credential="demo", product="aep")],
    )
    if problem := _listen_problem(settings, socket=True):
        return _fail(problem)
    logs.configure(settings.log_level, settings.log_format)
    registry = load_registry(plugin_dirs=settings.plugin_dirs)
    creds = settings.credentials_dir
    with FakeIms.in_thread(token_lifetime=args.token_lifetime) as fake:
        secret = secrets.token_urlsafe(24)
        fake.state.add_client("demo-client", secrets=[secret], scopes=DEMO_SCOPES, org_id=DEMO_ORG)
        _write_private(creds / "demo.secret", secret + "\n")
        gateway = f"{fake.url}/gateway/aep"  # the fake gateway stands in for platform.adobe.io
        host = fake.url.removeprefix("http://").rsplit(":", 1)[0]
        demo = {
            "auth": "oauth_server_to_server",
            "client_id": "demo-client",
            "client_secret_file": "demo.secret",
            "org_id": DEMO_ORG,
            "scopes": list(DEMO_SCOPES),
            "ims_url": fake.url,
            "products": ["generic", "aep"],
            "product": {"aep": {"sandbox": "dev", "base_url": gateway}},
            # A template (README "Templates"): a .netrc for tools that read one.
            "template": [
                {
                    "destination": "netrc",
                    "content": f"machine {host} login $client_id password $token\n",
                }
            ],
        }
        (creds / "demo.toml").write_bytes(tomlfile.render(creds / "demo.toml", demo))
        token_dir = settings.output_dir / "demo"

        async def ready(daemon: Daemon) -> None:
            metrics = (
                f"  metrics:     http://127.0.0.1:{daemon.metrics_port}/metrics\n"
                if daemon.metrics_port
                else ""
            )
            proxy = daemon.proxies[0][1] if daemon.proxies else None
            python = shlex.quote(sys.executable)
            client = (
                "import httpx; from imsd.client import HttpxAuth; "
                f'a = HttpxAuth("demo", product="aep", output_dir="{settings.output_dir}"); '
                f'print(httpx.get("{gateway}/data/foundation/catalog/datasets", auth=a).text)'
            )
            print(
                f"\nimsd demo is running against the fake IMS at {fake.url}\n"
                f"  credentials: {creds}  (edit, add or remove files: the daemon reacts)\n"
                f"  token files: {token_dir}/  (token, token.json, generic.headers, "
                "generic.env, aep.headers, aep.env, netrc)\n"
                f"  socket:      {_self_command()} status --socket {settings.socket}\n"
                f"{metrics}"
                f"  aep:  curl -sS -H @{token_dir}/aep.headers "
                f"{gateway}/data/foundation/catalog/datasets\n"
                f"  try:  curl -sS -H @{token_dir}/generic.headers "
                f"{fake.url}/gateway/generic/v1/ping\n"
                + (
                    f"  proxy:  curl -sS http://{proxy}/data/foundation/catalog/datasets\n"
                    if proxy
                    else ""
                )
                + f"  netrc:  cat {token_dir}/netrc  (a template, written again with every token)\n"
                f"  python: {python} -c {shlex.quote(client)}\n"
                "Press Ctrl-C to stop.\n",
                flush=True,
            )

        anyio.run(lambda: Daemon(settings, registry).run(on_ready=ready))
    print("imsd demo stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
