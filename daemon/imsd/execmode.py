"""``imsd exec NAME -- CMD…``: run CMD with a credential's token in its environment.

The token comes from the daemon's output files (``PRODUCT.env``, written atomically), so exec
needs no socket access. When the token rotates (``token.json`` changes), CMD is either sent a
signal (``--signal HUP``: for programs that re-read the token files themselves) or restarted
with the new environment (``--restart``). SIGTERM, SIGINT and SIGHUP are forwarded; exec
exits with CMD's exit code (128+N when CMD dies of signal N).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio
import anyio.abc
import structlog

from imsd.client import ImsdUnavailable, token_document

__all__ = ["ExecError", "exec_env", "parse_env_file", "run_exec"]

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


def _version(output_dir: Path, name: str) -> tuple[int, int] | None:
    try:
        st = (output_dir / name / "token.json").stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _settled(output_dir: Path, name: str, env: Mapping[str, str]) -> bool:
    """Whether the env file already carries the token that token.json names (the daemon
    writes token.json before the env files)."""
    try:
        doc = token_document(name, output_dir=output_dir, min_validity=0)
    except ImsdUnavailable:
        return False
    return env.get("ADOBE_ACCESS_TOKEN") == doc.get("access_token")


def _exit_code(rc: int | None) -> int:
    if rc is None:
        return 1
    return 128 - rc if rc < 0 else rc


async def run_exec(
    name: str,
    command: Sequence[str],
    *,
    output_dir: Path,
    product: str | None = None,
    rotate_signal: signal.Signals | None = None,
    restart: bool = False,
    poll_interval: float = 1.0,
    base_env: Mapping[str, str] | None = None,
    token_env: bool = True,
) -> int:
    """Run *command* with the credential's env variables. Without *token_env* the token
    itself stays out of the child's environment (which processes of the same uid can read
    in ``/proc/PID/environ``): it reads ``$IMSD_TOKEN_FILE``."""
    if not command:
        raise ExecError("no command given (imsd exec NAME -- CMD ...)")
    seen = _version(output_dir, name)  # before reading: a rotation meanwhile is not lost
    try:
        env = exec_env(output_dir, name, product)
    except ImsdUnavailable as e:
        if isinstance(e.__cause__, FileNotFoundError):  # the usual mistake: another dir
            path = output_dir / name / "token.json"
            raise ExecError(
                f"token file does not exist ({path}): is imsd running with output_dir "
                f"{output_dir}? pass its --output-dir; imsd status lists the credentials"
            ) from None
        raise ExecError(str(e)) from None
    base = dict(os.environ if base_env is None else base_env)
    # Where a --signal child re-reads the token (its environment cannot change).
    base["IMSD_TOKEN_FILE"] = str(output_dir / name / "token")
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
                    current = _version(output_dir, name)
                    if current is None or current == seen:
                        continue
                    try:
                        fresh = exec_env(output_dir, name, product)
                    except (ImsdUnavailable, ExecError) as e:
                        log.warning("exec.env_unavailable", credential=name, error=str(e))
                        continue
                    if not _settled(output_dir, name, fresh):
                        continue  # the daemon is between token.json and the env file
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
