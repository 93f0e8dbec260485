"""Which requests a proxy listener signs: the ``Host`` it was reached by, the browser context it
came from, and its method. Pure: :func:`admit` looks at a request's method and headers only.

Theory of operation. A TCP proxy on loopback signs whatever reaches its port, and a web browser
on the same machine reaches it on behalf of any page it shows. Two browser tricks matter:

- **DNS rebinding**: a page at ``http://attacker.example:PORT`` has its name re-pointed to
  127.0.0.1; the page's own same-origin requests then reach the proxy, and the browser lets the
  page read the signed answers. The browser still says ``Host: attacker.example:PORT``: a
  listener therefore accepts only the names it is known by (``localhost``, an IP literal, the
  listener's ``allowed_hosts``). An IP literal cannot be rebound: a page at
  ``http://127.0.0.1:PORT`` was served by the proxy itself.
- **Cross-site requests**: any page may send a "simple" request (a ``text/plain`` POST, a GET)
  to ``http://127.0.0.1:PORT`` without a CORS preflight; it cannot read the answer, but the
  request is signed and sent upstream. Browsers mark such requests: ``Origin`` (every
  cross-origin request but a top-level GET) and ``Sec-Fetch-Site`` (``cross-site``, or
  ``same-site`` for another port of the same host). A request carrying either is refused
  unless its ``Origin`` is one of the listener's ``allowed_origins``. Programs (curl, SDKs,
  servers) send neither, so nothing changes for them.

``TRACE``/``TRACK`` are refused everywhere: an upstream that echoes the request would hand the
injected token back to the client; ``CONNECT`` would ask for a tunnel this proxy never opens.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Final

__all__ = ["Refusal", "admit", "host_name", "normal_origin"]

#: Methods never forwarded (RFC 9110 section 9.3.8: TRACE reflects the request, headers
#: included; TRACK is IIS's twin; CONNECT asks for a tunnel).
REFUSED_METHODS: Final = frozenset({"TRACE", "TRACK", "CONNECT"})
_ALLOW: Final = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
_BROWSER_SITES: Final = frozenset({"cross-site", "same-site"})


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is not signed: its status, error code and message (safe to show: never
    the request's own header values, which a page chooses)."""

    status: int
    code: str
    message: str
    allow: str | None = None


def host_name(value: str) -> str | None:
    """The host part of a ``Host`` value, lower-case, without a trailing dot or the port;
    None if it is not ``host[:port]`` or ``[v6][:port]``."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[: end + 1], value[end + 1 :]
    else:
        host, sep, port = value.partition(":")
        rest = sep + port
    if rest and not (rest.startswith(":") and rest[1:].isdigit()):
        return None
    host = host.removesuffix(".")
    return host or None


def _ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
    except ValueError:
        return False
    return True


def normal_origin(origin: str) -> str:
    """*origin* as compared: lower-case, without a trailing slash."""
    return origin.strip().lower().rstrip("/")


def admit(
    method: str,
    headers: Iterable[tuple[str, str]],
    *,
    tcp: bool,
    allowed_hosts: Collection[str] = (),
    allowed_origins: Collection[str] = (),
) -> Refusal | None:
    """None if the request may be signed and sent; else why not. *allowed_hosts* are host
    names (lower-case, no port) and *allowed_origins* origins as :func:`normal_origin` makes
    them."""
    if method.upper() in REFUSED_METHODS:
        return Refusal(
            405,
            "method_not_allowed",
            f"{method.upper()} is never forwarded (it would echo the injected token or open "
            "a tunnel)",
            _ALLOW,
        )
    hosts: list[str] = []
    origins: list[str] = []
    sites: list[str] = []
    for name, value in headers:
        key = name.lower()
        if key == "host":
            hosts.append(value)
        elif key == "origin":
            origins.append(value)
        elif key == "sec-fetch-site":
            sites.append(value.strip().lower())
    if tcp:
        # h11 requires exactly one Host on HTTP/1.1; an HTTP/1.0 request may have none, and
        # no browser sends one without it.
        if len(hosts) > 1:
            return Refusal(400, "bad_host", "more than one Host header")
        if hosts:
            host = host_name(hosts[0])
            if host is None:
                return Refusal(400, "bad_host", "the Host header is not host[:port]")
            if host != "localhost" and not _ip_literal(host) and host not in allowed_hosts:
                return Refusal(
                    403,
                    "host_not_allowed",
                    "this proxy answers only to localhost, an IP address or its "
                    "allowed_hosts (a DNS-rebinding page names another host)",
                )
    if len(origins) > 1:
        return Refusal(403, "origin_not_allowed", "more than one Origin header")
    allowed = bool(origins) and normal_origin(origins[0]) in allowed_origins
    if origins and not allowed:
        return Refusal(
            403,
            "origin_not_allowed",
            "requests from web pages are refused unless their origin is in the proxy's "
            "allowed_origins",
        )
    if any(site in _BROWSER_SITES for site in sites) and not allowed:
        return Refusal(
            403,
            "origin_not_allowed",
            "cross-site requests from web pages are refused unless their origin is in the "
            "proxy's allowed_origins",
        )
    return None
