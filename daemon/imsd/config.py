"""Daemon settings: defaults < config file < ``IMSD_*`` environment < command-line flags.

The config file is TOML with the same keys as the fields of :class:`Settings`. Unknown keys
are errors (a typo must not silently fall back to a default). Secrets never live here: they
belong to credential files.
"""

from __future__ import annotations

import difflib
import enum
import grp
import os
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Final

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from imsd import logs
from imsd.model import DEFAULT_IMS_URL, check_ims_url, loopback_host
from imsd.schedule import RefreshPolicy

__all__ = [
    "DEFAULT_CONFIG",
    "ENV_PREFIX",
    "LOG_LEVELS",
    "RELOAD",
    "ConfigError",
    "ProxySpec",
    "Reload",
    "Settings",
    "load_settings",
    "pydantic_message",
    "unknown_env",
    "unknown_key",
]

DEFAULT_CONFIG: Final = Path("/etc/imsd/imsd.toml")
ENV_PREFIX: Final = "IMSD_"
ENV_SOURCE: Final = "environment (IMSD_*)"
FLAG_SOURCE: Final = "command line"


class ConfigError(ValueError):
    """The daemon configuration is unusable; the message names the source and the key."""


def _octal(v: Any) -> Any:
    if isinstance(v, str):
        try:
            return int(v, 8)
        except ValueError:
            raise ValueError("must be an octal mode such as 0600") from None
    return v


Mode = Annotated[int, BeforeValidator(_octal), Field(ge=0, le=0o777)]

LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")


class ProxySpec(BaseModel):
    """One ``[[proxy]]`` table: an authenticating forward proxy to one product instance of
    one credential (README "Proxy")."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    listen: str  # HOST:PORT, or an absolute Unix socket path
    credential: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    product: str = Field(min_length=1, max_length=64)  # a product or instance name
    # A TCP listener binds loopback only unless this says otherwise (logged loudly).
    allow_remote: bool = False
    # Upstream: connect and between-bytes timeout (a hung upstream answers 504).
    timeout: float = Field(60.0, gt=0, le=3600)
    # A TCP listener answers only to localhost, IP literals and these names in Host (a
    # DNS-rebinding page names its own); and to no web page unless its origin is listed here
    # (imsd.admission says why).
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    # A TCP listener serves only the users the socket API allows (allowed_uids/gids), found
    # as the owners of the client sockets (imsd.tcppeer): on unless allow_remote (a remote
    # client is no local user). A Unix-socket listener always checks its peers.
    peer_check: bool | None = None

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for host in v:
            name = host.strip().lower().removesuffix(".")
            if not name or any(c in name for c in ":/@ []") or name == "*":
                raise ValueError(
                    f"{host!r}: expected a host name without scheme or port (e.g. imsd-proxy)"
                )
            out.append(name)
        return tuple(out)

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for origin in v:
            norm = origin.strip().lower().rstrip("/")
            scheme, sep, rest = norm.partition("://")
            if scheme not in ("http", "https") or not sep or not rest or "/" in rest:
                raise ValueError(
                    f"{origin!r}: expected an origin, scheme://host[:port] "
                    "(e.g. http://localhost:3000); never * or null"
                )
            out.append(norm)
        return tuple(out)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        if v.startswith("/"):
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError("expected HOST:PORT (e.g. 127.0.0.1:8080) or a Unix socket path")
        return v

    @model_validator(mode="after")
    def _loopback_only(self) -> ProxySpec:
        if self.tcp and not self.allow_remote and not loopback_host(self.host):
            raise ValueError(
                "a proxy listens on a loopback address unless allow_remote = true "
                "(anyone who can reach it uses the credential)"
            )
        return self

    @property
    def tcp(self) -> bool:
        return not self.listen.startswith("/")

    @property
    def checks_peers(self) -> bool:
        if not self.tcp:
            return True
        return self.peer_check if self.peer_check is not None else not self.allow_remote

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    credentials_dir: Path = Path("/etc/imsd/credentials")
    output_dir: Path = Path("/run/imsd/tokens")
    state_dir: Path = Path("/var/lib/imsd")
    socket: Path = Path("/run/imsd/imsd.sock")
    metrics_address: str = "127.0.0.1:9464"
    ims_url: str = DEFAULT_IMS_URL
    log_format: str | None = None
    log_level: str = "info"
    file_mode: Mode = 0o600
    file_group: str | None = None
    # The socket API (README "Socket API").
    socket_mode: Mode = 0o660
    socket_group: str | None = None
    allowed_uids: list[int] | None = None  # None: the daemon's own uid and root
    allowed_gids: list[int] = Field(default_factory=list)
    min_refresh_interval: float = Field(30.0, ge=0)
    # Open connections per listener (socket API, metrics); the oldest idle are shed first.
    # Lowered at start when the descriptor limit could not hold them all (README "Limits").
    max_connections: int = Field(1024, ge=8, le=1_000_000)
    # Local plugin modules (*.py), loaded after the installed entry points.
    plugin_dirs: list[Path] = Field(default_factory=list)
    # Where secret files and template sources may be, besides credentials_dir and
    # $CREDENTIALS_DIRECTORY (README "The credential file"): the daemon's to say, never a
    # credential file's (whose writer also picks where the secrets are sent).
    secret_roots: list[Path] = Field(default_factory=lambda: [Path("/run/secrets")])
    # The refresh rule (README "Refresh rule").
    refresh_fraction: float = Field(0.8, gt=0, lt=1)
    jitter_fraction: float = Field(0.05, ge=0, lt=1)
    min_margin: float = Field(600.0, ge=0)
    backoff_initial: float = Field(1.0, gt=0)
    backoff_cap: float = Field(300.0, gt=0)
    recheck_interval: float = Field(30.0, gt=0, le=300)
    # IMS traffic limits.
    max_concurrent_requests: int = Field(8, ge=1, le=1024)
    request_rate: float | None = Field(20.0, gt=0)
    request_burst: int = Field(8, ge=1)
    request_timeout: float = Field(30.0, gt=0)
    # Watching.
    debounce_ms: int = Field(200, ge=10, le=10_000)
    rescan_interval: float = Field(60.0, gt=0)
    # Fleet mode (README "Fleet mode (Redis)"): off unless a Redis URL is given.
    coordination: str | None = None
    coordination_prefix: str = Field("imsd", min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    coordination_password_file: Path | None = None
    coordination_password_env: str | None = None
    coordination_lease: float = Field(10.0, ge=0.5, le=300)
    # Authenticating forward proxies (README "Proxy"): none unless configured.
    proxy: list[ProxySpec] = Field(default_factory=list)

    @field_validator("coordination")
    @classmethod
    def _coordination(cls, v: str | None) -> str | None:
        if not v:
            return None
        scheme, sep, rest = v.partition("://")
        if not sep or scheme not in ("redis", "rediss", "unix"):
            raise ValueError("expected redis://HOST:PORT/DB, rediss://… (TLS) or unix:///PATH")
        if "@" in rest.split("/", 1)[0] or (scheme == "unix" and "@" in rest):
            # Never quoted back: the part before @ may be a password.
            raise ValueError(
                "no credentials in the URL: name coordination_password_file or "
                "coordination_password_env instead"
            )
        return v

    @field_validator("secret_roots")
    @classmethod
    def _secret_roots(cls, v: list[Path]) -> list[Path]:
        if any(not p.is_absolute() for p in v):
            raise ValueError("every secret root must be an absolute directory path")
        return v

    @field_validator("ims_url")
    @classmethod
    def _ims_url(cls, v: str) -> str:
        return check_ims_url(v)  # its errors never quote the URL (a password in it)

    @field_validator("metrics_address")
    @classmethod
    def _metrics_address(cls, v: str) -> str:
        if v == "":
            return v  # no metrics listener
        host, sep, port = v.rpartition(":")
        if not sep or not port.isdigit() or int(port) > 65535 or any(c.isspace() for c in host):
            raise ValueError("expected HOST:PORT with a port 0-65535 (e.g. 127.0.0.1:9464)")
        return v

    @field_validator("log_format")
    @classmethod
    def _log_format(cls, v: str | None) -> str | None:
        if v is not None and v not in logs.FORMATS:
            raise ValueError(f"must be one of {', '.join(logs.FORMATS)}")
        return v

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.lower() not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return v.lower()

    def refresh_policy(self) -> RefreshPolicy:
        return RefreshPolicy(
            refresh_fraction=self.refresh_fraction,
            jitter_fraction=self.jitter_fraction,
            min_margin=self.min_margin,
            backoff_initial=self.backoff_initial,
            backoff_cap=self.backoff_cap,
            recheck_interval=self.recheck_interval,
        )

    def secret_root_paths(self, env: Mapping[str, str]) -> tuple[Path, ...]:
        """Every place a secret file or template source may be: the credentials directory,
        ``$CREDENTIALS_DIRECTORY`` when set (systemd ``LoadCredential=``), ``secret_roots``."""
        systemd = env.get("CREDENTIALS_DIRECTORY")
        return (self.credentials_dir, *([Path(systemd)] if systemd else []), *self.secret_roots)

    def file_gid(self) -> int | None:
        """The numeric group for output files, or None to keep the daemon's group."""
        return _gid("file_group", self.file_group)

    def socket_gid(self) -> int | None:
        return _gid("socket_group", self.socket_group)


def _gid(key: str, group: str | None) -> int | None:
    if group is None or group == "":
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(
            f"no such group {group!r} (key {key}): create the group or name an existing one"
        ) from None


FIELDS: Final = frozenset(Settings.model_fields)


class Reload(enum.Enum):
    """What SIGHUP does with a changed setting."""

    APPLIED = "applied"  # in effect for the next request, refresh or scan
    RESTART = "restart"  # the running value is kept, and the reload logs a warning naming it


_A, _R = Reload.APPLIED, Reload.RESTART

#: Every setting, and whether a reload applies it. The one place this is decided: the daemon's
#: reload reads it, the README's table repeats it, and a test walks it for every field.
RELOAD: Final[Mapping[str, Reload]] = {
    # The watcher, the sinks and the state file are built around these paths and modes.
    "credentials_dir": _R,
    "output_dir": _R,
    "state_dir": _R,
    "file_mode": _R,
    "file_group": _R,
    # Listeners are rebound when their address or mode changes; access rules apply to the
    # next request, also on connections opened before the reload.
    "socket": _A,
    "socket_mode": _A,
    "socket_group": _A,
    "metrics_address": _A,
    "allowed_uids": _A,
    "allowed_gids": _A,
    "min_refresh_interval": _A,
    "max_connections": _A,
    # Every credential file is re-parsed with the new default IMS host.
    "ims_url": _A,
    "log_format": _R,  # the handler and its stream are chosen once, at start
    "log_level": _A,
    "plugin_dirs": _R,  # plugins are loaded once: a module cannot be unloaded
    "secret_roots": _A,  # every credential file is re-parsed
    # The refresh rule: the next schedule computed uses it.
    "refresh_fraction": _A,
    "jitter_fraction": _A,
    "min_margin": _A,
    "backoff_initial": _A,
    "backoff_cap": _A,
    "recheck_interval": _A,
    # The IMS client (its pool, rate bucket and timeouts) lives as long as the process.
    "max_concurrent_requests": _R,
    "request_rate": _R,
    "request_burst": _R,
    "request_timeout": _R,
    "debounce_ms": _R,
    "rescan_interval": _R,
    # The Redis connection and the fleet's keys are set up once, at start.
    "coordination": _R,
    "coordination_prefix": _R,
    "coordination_password_file": _R,
    "coordination_password_env": _R,
    "coordination_lease": _R,
    # Proxy listeners are bound once, at start (their peer rules follow the socket's: applied).
    "proxy": _R,
}


def _where(source: str, key: str) -> str:
    if source == ENV_SOURCE:
        return f"environment {ENV_PREFIX}{key.upper()}"
    if source == FLAG_SOURCE:
        return "--" + key.replace("_", "-")
    return f"{source}, key {key}"


def _shown(key: str, value: Any) -> str:
    # ims_url may hold a password; anything long is cut so the error stays one line.
    if key == "ims_url" or isinstance(value, dict | list):
        return ""
    text = repr(value)
    return " " + (text if len(text) <= 60 else text[:57] + "...")


def unknown_key(key: str, known: Iterable[str], documented: str) -> tuple[str, str]:
    """What and what to do for a key that is not one of *known*: the one wording of the
    config file and of credential files (``unknown key 'ouput_dir'`` and ``did you mean
    'output_dir'?``, or where the keys are *documented*)."""
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"not a known key; see {documented}"
    return f"unknown key {key!r}", hint


def pydantic_message(error: Any) -> str:
    """A pydantic error's message without its "Value error, " prefix: the wording the README
    shows, for the config file and credential files alike."""
    return str(error["msg"]).removeprefix("Value error, ")


def _one(source: str, e: Any) -> str:
    key = str(e["loc"][0]) if e["loc"] else "(top level)"
    if e["type"] == "extra_forbidden":
        what, hint = unknown_key(key, FIELDS, "the README's configuration reference")
        return f"{what} ({source}): {hint}"
    msg = pydantic_message(e)
    return f"invalid {key}{_shown(key, e.get('input'))} ({_where(source, key)}): {msg}"


def _format(source: str, err: ValidationError) -> ConfigError:
    """One line (the CLI prints it as is): the first problem, then the other keys named."""
    errors = err.errors(include_url=False)
    first = _one(source, errors[0])
    rest = sorted({str(e["loc"][0]) for e in errors[1:] if e["loc"]})
    return ConfigError(first + (f"; also invalid: {', '.join(rest)}" if rest else ""))


def _read_file(path: Path, *, required: bool) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if required:
            raise ConfigError(
                f"config file not found ({path}): create it, or name another with --config"
            ) from None
        return {}
    except OSError as e:
        raise ConfigError(
            f"cannot read config file ({path}): {e.strerror}; check the path and its permissions"
        ) from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"invalid TOML ({path}): {e}; fix the file") from None


#: ``IMSD_*`` names that are not settings: the config file's path, and what imsd itself sets
#: for the commands it runs (``imsd exec``, on_refresh actions), which a daemon started from
#: such a command inherits.
OTHER_ENV: Final = frozenset({"IMSD_CONFIG", "IMSD_CREDENTIAL", "IMSD_TOKEN_FILE"})


def unknown_env(env: Mapping[str, str]) -> list[str]:
    """One warning per ``IMSD_*`` variable no setting reads, with the nearest known name: a
    misspelt ``IMSD_OUTPT_DIR`` would otherwise be ignored in silence and the default used."""
    known = {ENV_PREFIX + f.upper() for f in FIELDS} | OTHER_ENV
    out = []
    for key in sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in known):
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"did you mean {close[0]}?" if close else "see the configuration reference"
        shown = key if key.isprintable() else ascii(key)
        out.append(f"unknown environment variable {shown} (ignored): {hint}")
    return out


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        field = key[len(ENV_PREFIX) :].lower()
        if field not in FIELDS:
            continue
        if field in _LISTS:
            out[field] = [v.strip() for v in value.split(",") if v.strip()]
        elif value == "" and field in _NULLABLE:
            out[field] = None
        else:
            out[field] = value
    return out


_LISTS: Final = frozenset({"allowed_uids", "allowed_gids", "plugin_dirs", "secret_roots"})
_NULLABLE: Final = frozenset(
    {
        "request_rate",
        "allowed_uids",
        "file_group",
        "socket_group",
        "coordination",
        "coordination_password_file",
        "coordination_password_env",
    }
)


def _default_config(env: Mapping[str, str]) -> Path:
    """``imsd.toml`` in the unit's ``ConfigurationDirectory=`` under systemd (the first of
    ``$CONFIGURATION_DIRECTORY``'s colon-separated paths), else ``/etc/imsd/imsd.toml``: so
    the unit needs no ``--config``, which would make the file mandatory."""
    unit_dir = env.get("CONFIGURATION_DIRECTORY", "").split(":")[0]
    return Path(unit_dir) / DEFAULT_CONFIG.name if unit_dir else DEFAULT_CONFIG


def load_settings(
    config: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge the layers. *config* None means ``$IMSD_CONFIG`` or the default path, which may
    be absent; an explicitly named file must exist."""
    env = os.environ if env is None else env
    required = config is not None or bool(env.get("IMSD_CONFIG"))
    path = config or Path(env.get("IMSD_CONFIG") or _default_config(env))
    layers: list[tuple[str, dict[str, Any]]] = [
        (str(path), _read_file(path, required=required)),
        (ENV_SOURCE, _from_env(env)),
        (FLAG_SOURCE, {k: v for k, v in (overrides or {}).items() if v is not None}),
    ]
    merged: dict[str, Any] = {}
    for source, values in layers:
        merged.update(values)
        try:  # validate each layer as it lands so errors name their source
            Settings.model_validate(merged)
        except ValidationError as e:
            raise _format(source, e) from None
    settings = Settings.model_validate(merged)
    if settings.backoff_initial > settings.backoff_cap:
        raise ConfigError(
            f"backoff_initial {settings.backoff_initial} exceeds backoff_cap "
            f"{settings.backoff_cap} (settings): lower backoff_initial or raise backoff_cap"
        )
    settings.file_gid()  # fail early on an unknown group
    settings.socket_gid()
    return settings
