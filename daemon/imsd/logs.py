"""Logging: structlog over the stdlib, with a redaction processor and no locals in tracebacks.

Three renderers: JSON lines (default, containers and files), console (a TTY), and journald
(``<N>``-prefixed logfmt, chosen when ``JOURNAL_STREAM`` is set). Every renderer runs
:func:`redact` last before rendering, so a secret that slips into an event, a field or an
exception message is replaced. The first defence stays the :class:`~imsd.model.Secret` type;
this processor is the net under it.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
from typing import Any, Final, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = [
    "FORMATS",
    "JournalRenderer",
    "LogThrottle",
    "configure",
    "redact",
    "scrub",
    "set_level",
]

FORMATS: Final = ("json", "console", "journald")

_SECRET_KEY = re.compile(
    r"(?i)^(authorization|cookie|set-cookie|password|passphrase|client_secret|client_assertion|"
    r"assertion|refresh_token|access_token|id_token|jwt_token|token|api_secret|private_key)$"
    r"|_(secret|token|password|passphrase)$"
)
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")
_QUERY = re.compile(
    r"(?i)([?&](?:client_secret|access_token|refresh_token|id_token|jwt_token|code|assertion|"
    r"password)=)[^&#\s]+"
)
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_P8E = re.compile(r"\bp8e-[A-Za-z0-9_-]{8,}")  # Adobe client secrets usually look like this
_PEM = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.S
)
_REDACTED: Final = "[REDACTED]"


class LogThrottle:
    """At most one log line per key per *every* seconds, for lines a client can cause (a
    refused request in a loop must not fill the disk). :meth:`due` says whether to log now
    and how many lines of that key were held back since the last one; the counters in the
    metrics still count every event."""

    def __init__(self, every: float = 60.0, *, limit: int = 4096) -> None:
        self.every = every
        self._limit = limit
        self._seen: dict[object, tuple[float, int]] = {}

    def due(self, key: object, now: float) -> int | None:
        """None to stay silent; else the number of lines suppressed since the last one."""
        logged, suppressed = self._seen.get(key, (-math.inf, 0))
        if now - logged < self.every:
            self._seen[key] = (logged, suppressed + 1)
            return None
        if len(self._seen) >= self._limit:  # many keys (uids, reasons): forget, do not grow
            self._seen.clear()
        self._seen[key] = (now, 0)
        return suppressed


def scrub(value: Any, depth: int = 0) -> Any:
    """Return *value* with secret-looking strings and secret-named keys redacted."""
    if depth > 6:
        return value
    if isinstance(value, str):
        value = _PEM.sub(_REDACTED, value)
        value = _BEARER.sub(r"\1 " + _REDACTED, value)
        value = _JWT.sub(_REDACTED, value)
        value = _P8E.sub(_REDACTED, value)
        return _QUERY.sub(r"\1" + _REDACTED, value)
    if isinstance(value, dict):
        return {
            k: _REDACTED if isinstance(k, str) and _SECRET_KEY.search(k) else scrub(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(scrub(v, depth + 1) for v in value)
    return value


def redact(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: redact secrets everywhere in the event."""
    out: EventDict = scrub(dict(event_dict))
    return out


class JournalRenderer:
    """``<prio>event key=value …``: journald maps the ``<N>`` prefix to PRIORITY."""

    _PRIO: Final = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}

    def __init__(self) -> None:
        self._kv = structlog.processors.LogfmtRenderer()

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> str:
        prio = self._PRIO.get(str(event_dict.pop("level", "info")), 6)
        event = str(event_dict.pop("event", ""))
        return f"<{prio}>{event} {self._kv(logger, name, event_dict)}".rstrip()


def _default_format(stream: TextIO) -> str:
    if os.environ.get("JOURNAL_STREAM"):
        return "journald"
    return "console" if stream.isatty() else "json"


def _tail(fmt: str) -> list[Processor]:
    no_locals = structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
    if fmt == "json":
        return [
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.ExceptionRenderer(no_locals),
            redact,
            structlog.processors.JSONRenderer(),
        ]
    if fmt == "journald":
        return [structlog.processors.format_exc_info, redact, JournalRenderer()]
    if fmt == "console":
        return [
            structlog.processors.TimeStamper(fmt="%H:%M:%S"),
            structlog.processors.format_exc_info,  # plain traceback text, never locals
            redact,
            structlog.dev.ConsoleRenderer(colors=False),
        ]
    raise ValueError(f"unknown log format {fmt!r} (choose from {', '.join(FORMATS)})")


def configure(
    level: str | int = "info", fmt: str | None = None, stream: TextIO | None = None
) -> None:
    """Configure structlog and the stdlib root logger. Safe to call more than once."""
    stream = stream or sys.stderr
    fmt = fmt or _default_format(stream)
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.stdlib.ExtraAdder(),
    ]
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *_tail(fmt)],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for noisy in ("httpx", "httpcore", "watchfiles"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=False,
    )


def set_level(level: str) -> None:
    """Change the level in place (SIGHUP), keeping the handler, format and stream."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    logging.getLogger().setLevel(numeric)
    for noisy in ("httpx", "httpcore", "watchfiles"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(numeric))
