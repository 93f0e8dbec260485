"""``imsd exec NAME -- CMD…``: run CMD with a credential's token in its environment.

The token and the product's variables come from one of two sources (README "Using the
tokens"): the daemon's output files (``PRODUCT.env``, written atomically; no socket access
needed) or its socket API (``GET …/headers``; no file access needed). The CLI decides which:
``--socket`` alone means the socket, ``--output-dir`` the files, neither the files first and
then the socket. When the token rotates, CMD is either sent a signal (``--signal HUP``: for
programs that re-read the token file themselves) or restarted with the new environment
(``--restart``). SIGTERM, SIGINT and SIGHUP are forwarded; exec exits with CMD's exit code
(128+N when CMD dies of signal N).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

import anyio
import anyio.abc
import structlog

from imsd.client import ImsdUnavailable, request, token_document

__all__ = ["ExecError", "FileSource", "SocketSource", "exec_env", "parse_env_file", "run_exec"]

log = structlog.get_logger("imsd.exec")

_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class ExecError(RuntimeError):
    pass


def parse_env_file(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        out[key] = value
    return out


def exec_env(output_dir: Path, name: str, product: str | None) -> dict[str, str]:
    """The variables for CMD: the product's env file of credential *name*."""
    doc = token_document(name, output_dir=output_dir, min_validity=0)
    products = list((doc.get("headers") or {}).keys())
    chosen = product or (products[0] if products else "generic")
    path = output_dir / name / f"{chosen}.env"
    try:
        return parse_env_file(path.read_text())
    except FileNotFoundError:
        raise ExecError(f"{path} does not exist (products of {name}: {products})") from None


class FileSource:
    """The daemon's output files. Each source has ``version`` (changes when the token
    rotates; None while unreadable), ``env`` (CMD's variables, or ImsdUnavailable/ExecError)
    and ``settled`` (whether those variables carry the current token); all block."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir

    def version(self, name: str) -> object | None:
        try:
            st = (self.output_dir / name / "token.json").stat()
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns

    def env(self, name: str, product: str | None) -> dict[str, str]:
        return exec_env(self.output_dir, name, product)

    def settled(self, name: str, env: Mapping[str, str]) -> bool:
        # The daemon writes token.json before the env files: in between, the env file still
        # holds the previous token.
        try:
            doc = token_document(name, output_dir=self.output_dir, min_validity=0)
        except ImsdUnavailable:
            return False
        return env.get("ADOBE_ACCESS_TOKEN") == doc.get("access_token")

    def problem(self, name: str, e: Exception) -> str:
        if isinstance(e.__cause__, FileNotFoundError):  # the usual mistake: another dir
            return f"{self.output_dir / name / 'token.json'}: does not exist"
        return str(e)


class SocketSource:
    """The daemon's socket API: ``GET /v1/credentials/NAME/token`` and ``…/headers``."""

    def __init__(self, socket: Path, timeout: float = 5.0) -> None:
        self.socket = socket
        self.timeout = timeout

    def version(self, name: str) -> object | None:
        try:
            path = f"/v1/credentials/{quote(name, safe='')}/token"
            doc = request("GET", path, socket=self.socket, timeout=self.timeout)
        except ImsdUnavailable:
            return None
        return doc.get("access_token")

    def env(self, name: str, product: str | None) -> dict[str, str]:
        query = f"?product={quote(product, safe='')}" if product else ""
        path = f"/v1/credentials/{quote(name, safe='')}/headers{query}"
        doc = request("GET", path, socket=self.socket, timeout=self.timeout)
        env = doc.get("env")
        if not isinstance(env, dict):
            raise ImsdUnavailable(f"imsd answered without env variables ({self.socket})")
        return {str(k): str(v) for k, v in env.items()}

    def settled(self, name: str, env: Mapping[str, str]) -> bool:
        return True  # one answer of the daemon: token and variables from the same grant

    def problem(self, name: str, e: Exception) -> str:
        return f"socket {self.socket}: {e}"


_Source = FileSource | SocketSource


def _explain(name: str, tried: list[tuple[_Source, Exception]]) -> str:
    """One line ``<what> (<where>): <what to do>`` naming every source exec tried."""
    if len(tried) == 1:
        source, e = tried[0]
        if isinstance(source, FileSource):
            if isinstance(e.__cause__, FileNotFoundError):
                path = source.output_dir / name / "token.json"
                return (
                    f"token file does not exist ({path}): is imsd running with output_dir "
                    f"{source.output_dir}? pass its --output-dir (or --socket to ask the "
                    "daemon); imsd status lists the credentials"
                )
            return str(e)
        if isinstance(e, ImsdUnavailable) and e.status is None:  # nothing answered there
            return f"{e}: start imsd or pass its --socket (or --output-dir to read its token files)"
        return f"{e} (socket {source.socket}): imsd status --socket {source.socket} says why"
    where = "; ".join(source.problem(name, e) for source, e in tried)
    return (
        f"no token for {name} (tried {where}): pass the daemon's --output-dir or --socket; "
        "imsd status lists the credentials"
    )


def _exit_code(rc: int | None) -> int:
    if rc is None:
        return 1
    return 128 - rc if rc < 0 else rc


async def run_exec(
    name: str,
    command: Sequence[str],
    *,
    output_dir: Path,
    socket: Path | None = None,
    files: bool = True,
    product: str | None = None,
    rotate_signal: signal.Signals | None = None,
    restart: bool = False,
    poll_interval: float = 1.0,
    base_env: Mapping[str, str] | None = None,
    token_env: bool = True,
) -> int:
    """Run *command* with the credential's env variables, read from the files in
    *output_dir* (if *files*), else or failing that from the daemon at *socket* (if given):
    the first that has a usable token is used from then on. Without *token_env* the token
    itself stays out of the child's environment (which processes of the same uid can read in
    ``/proc/PID/environ``): it reads ``$IMSD_TOKEN_FILE``."""
    if not command:
        raise ExecError("no command given (imsd exec NAME -- CMD ...)")
    sources: list[_Source] = []
    if files:
        sources.append(FileSource(output_dir))
    if socket is not None:
        sources.append(SocketSource(socket))
    if not sources:
        raise ExecError("no source for the token: give an output directory or a socket")
    tried: list[tuple[_Source, Exception]] = []
    for source in sources:
        seen = source.version(name)  # before reading: a rotation meanwhile is not lost
        try:
            env = source.env(name, product)
            break
        except (ImsdUnavailable, ExecError) as e:
            tried.append((source, e))
    else:
        raise ExecError(_explain(name, tried))
    token_file = output_dir / name / "token"
    if not token_env and not token_file.exists():
        raise ExecError(
            f"--no-token-env needs the daemon's token file ({token_file}): pass the daemon's "
            "--output-dir, or drop --no-token-env"
        )
    base = dict(os.environ if base_env is None else base_env)
    # Where a --signal child re-reads the token (its environment cannot change).
    base["IMSD_TOKEN_FILE"] = str(token_file)
    stopping = False
    while True:
        try:
            child_env = {**base, **env}
            if not token_env:
                child_env.pop("ADOBE_ACCESS_TOKEN", None)
            proc = await anyio.open_process(
                list(command), env=child_env, stdin=None, stdout=None, stderr=None
            )
        except OSError as e:
            raise ExecError(f"cannot run {command[0]}: {e.strerror or e}") from None
        restart_now = False
        async with anyio.create_task_group() as tg:

            async def forward(p: anyio.abc.Process = proc) -> None:
                nonlocal stopping
                with anyio.open_signal_receiver(*_FORWARDED) as signals:
                    async for signum in signals:
                        if signum in (signal.SIGTERM, signal.SIGINT):
                            stopping = True
                        p.send_signal(signum)

            async def watch(p: anyio.abc.Process = proc) -> None:
                nonlocal seen, env, restart_now, stopping
                while True:
                    await anyio.sleep(poll_interval)
                    current = await anyio.to_thread.run_sync(source.version, name)
                    if current is None or current == seen:
                        continue
                    try:
                        fresh = await anyio.to_thread.run_sync(source.env, name, product)
                    except (ImsdUnavailable, ExecError) as e:
                        log.warning("exec.env_unavailable", credential=name, error=str(e))
                        continue
                    if not await anyio.to_thread.run_sync(source.settled, name, fresh):
                        continue  # the daemon is between token.json and the env file
                    if fresh == env:  # files rewritten with the same token: nothing to do
                        seen = current
                        continue
                    seen, env = current, fresh
                    log.info(
                        "exec.token_rotated",
                        credential=name,
                        action="restart" if restart else "signal",
                    )
                    if restart:
                        restart_now = True
                        stopping = False  # only a stop signal during the restart prevents it
                        p.terminate()
                        with anyio.move_on_after(10):
                            await p.wait()
                        if p.returncode is None:
                            p.kill()
                        return
                    if rotate_signal is not None:
                        p.send_signal(rotate_signal)

            tg.start_soon(forward)
            tg.start_soon(watch)
            rc = await proc.wait()
            tg.cancel_scope.cancel()
        if restart_now and not stopping:
            continue
        return _exit_code(rc)
