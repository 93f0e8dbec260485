"""Value types shared by every part of imsd.

Everything here is immutable and free of I/O. Secrets are wrapped in :class:`Secret`, whose
``repr``/``str`` never show the value, so that a credential or token that ends up in a log
line, an exception message or a traceback prints ``'**********'`` instead of the secret.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from imsd.actions import Action
    from imsd.templates import OutputTemplate

__all__ = [
    "AUTH_S2S",
    "DEFAULT_IMS_URL",
    "MAX_TIMESTAMP",
    "NAME_RE",
    "OUTPUT_KINDS",
    "Credential",
    "CredentialError",
    "CredentialState",
    "Grant",
    "HttpRequest",
    "HttpResponse",
    "ImsError",
    "ImsErrorKind",
    "Secret",
    "ValidatedOptions",
    "check_ims_url",
    "https_or_loopback",
    "loopback_host",
    "usable_time",
]

DEFAULT_IMS_URL: Final = "https://ims-na1.adobelogin.com"
AUTH_S2S: Final = "oauth_server_to_server"
#: A credential name, also its output directory's name: never only dots ("." and ".." are
#: not directories of their own, and any run of dots is easily mistaken for one).
NAME_RE: Final = re.compile(r"^(?!\.+$)[A-Za-z0-9._-]{1,64}$")
#: Output kinds a credential may ask for; ``outputs`` defaults to all of them.
OUTPUT_KINDS: Final = ("token", "json", "headers", "env")
#: The latest time a grant may carry: the end of year 9999, the last one RFC 3339 can write.
MAX_TIMESTAMP: Final = 253_402_300_799


def usable_time(value: object) -> bool:
    """A Unix time every part of imsd can handle: a real number (not a bool), finite and
    between the epoch and :data:`MAX_TIMESTAMP`. NaN, infinities and huge numbers (which
    IMS's JSON or a state file may carry) crash ``datetime`` and never compare sanely."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return 0 <= value <= MAX_TIMESTAMP  # False for NaN; exact for ints of any size


def loopback_host(host: str) -> bool:
    """Whether *host* (a name or an address) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def https_or_loopback(url: str) -> bool:
    """The one rule for where a secret may be sent: ``https://``, or plain ``http://`` only to
    a loopback host (the fake IMS, a local proxy), so that nothing crosses a network in clear
    text. Settings and credential files apply it through :func:`check_ims_url`."""
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        return False
    return parts.scheme == "https" or (parts.scheme == "http" and loopback_host(host))


def check_ims_url(url: str) -> str:
    """*url* without a trailing slash if it can name an IMS host, else ValueError (whose
    message never quotes the URL). Userinfo is refused: ``user:password@`` would be sent as
    Basic auth and be printed with every network error; so are a query and a fragment."""
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises for a port that is not a number
    except ValueError:
        raise ValueError("must be an https:// URL with a numeric port") from None
    if "@" in parts.netloc:
        raise ValueError("must not contain user:password@ (credentials go in their own fields)")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError("must not have a query or a fragment")
    if not https_or_loopback(url):
        raise ValueError("must be an https:// URL (http:// only to a loopback host)")
    return url.rstrip("/")


class Secret:
    """A string that never shows itself in ``repr``, ``str`` or ``format``.

    Call :meth:`reveal` at the one place the value must leave the process (an HTTP form body,
    a token file). Equality compares values so that a changed secret is a changed credential.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> Any:  # pickling would bypass the redaction
        raise TypeError("Secret cannot be pickled")


class CredentialError(ValueError):
    """A credential file that cannot be used. The message names the file and the field and
    never contains a secret value."""

    def __init__(self, path: Path | str, message: str, *, field: str | None = None) -> None:
        self.path = str(path)
        self.field = field
        self.reason = message
        where = f"{self.path}: {field}: " if field else f"{self.path}: "
        super().__init__(where + message)


class ValidatedOptions(dict[str, Mapping[str, Any]]):
    """``Credential.product_options`` as :func:`imsd.registry.validate_products` leaves them:
    each product's table is what its ``validate_options`` returned, so rendering uses it as it
    is. Any other mapping (a credential that did not go through it, or a copy given other
    options) is validated where it is used. Equal to a plain dict with the same items."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Credential:
    """One validated credential, ready to be exchanged for tokens.

    ``options`` holds auth-method-specific fields (e.g. ``technical_account_id`` for JWT);
    ``product_options`` the per-instance tables (``[product.aep] sandbox = "dev"``).
    ``digest`` is the content hash of everything that defines the credential, secret
    included; the catalog compares digests to detect a change.
    """

    name: str
    path: Path
    auth: str
    client_id: str
    client_secret: Secret
    org_id: str
    scopes: tuple[str, ...]
    ims_url: str = DEFAULT_IMS_URL
    products: tuple[str, ...] = ("generic",)
    outputs: tuple[str, ...] = OUTPUT_KINDS
    #: keyed by instance name (which is the product's name for a plain ``[product.aep]``)
    product_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    extra_headers: Mapping[str, str] = field(default_factory=dict)
    on_refresh: Action | None = None  # what to tell consumers after a refresh
    templates: tuple[OutputTemplate, ...] = ()  # README "Templates": files of its own
    digest: str = ""
    #: the files its secrets were read from, each with the SHA-256 of the value read: a re-scan
    #: re-parses the credential when one changes
    sources: tuple[tuple[Path, bytes], ...] = field(default=(), compare=False, repr=False)
    #: (instance name, product) in the order of the file's ``products``; empty: one instance
    #: per product, named after it. ``products`` holds each product once, so code that wants
    #: plugins (notices) needs no idea of instances.
    instances: tuple[tuple[str, str], ...] = ()
    #: the memo of :attr:`identity` (read several times per refresh; hashing the secret again
    #: each time showed in profiles); not an argument, so ``replace`` starts it afresh
    _identity: str = field(default="", init=False, compare=False, repr=False)

    @property
    def product_instances(self) -> tuple[tuple[str, str], ...]:
        """(instance name, product) for every set of headers/env files: what outputs,
        ``token.json``'s ``headers`` and ``?product=`` are keyed by."""
        return self.instances or tuple((p, p) for p in self.products)

    @property
    def identity(self) -> str:
        """Hash of what determines which token IMS issues (auth method and its options
        included: a new private key or a new refresh token from a login): a stored token or
        refresh token minted under a different identity must not be reused."""
        if self._identity:
            return self._identity
        h = hashlib.sha256()
        for part in (
            self.auth,
            self.client_id,
            self.client_secret.reveal(),
            self.org_id,
            ",".join(self.scopes),
            self.ims_url.rstrip("/"),
            *(f"{k}={_plain(v)}" for k, v in sorted(self.options.items())),
        ):
            h.update(part.encode())
            h.update(b"\0")
        object.__setattr__(self, "_identity", h.hexdigest())  # frozen: set once, here
        return self._identity


def _plain(value: Any) -> str:
    if isinstance(value, Secret):
        return value.reveal()
    if isinstance(value, tuple | list):
        return ",".join(_plain(v) for v in value)
    return str(value)


class CredentialState(enum.Enum):
    """What a credential's current token is worth, as served and as exported in metrics."""

    PENDING = "pending"  # no token yet, first fetch not finished
    VALID = "valid"  # token fetched and not due for refresh failure
    STALE = "stale"  # refresh failing, last token still valid
    EXPIRED = "expired"  # refresh failing, last token expired (or none ever fetched)
    INVALID = "invalid"  # the credential file itself is broken and there is no last good one


@dataclass(frozen=True, slots=True)
class Grant:
    """An access token as obtained from IMS, with its lifetime resolved to wall-clock times
    (Unix seconds, float)."""

    access_token: Secret
    token_type: str
    issued_at: float
    expires_at: float
    refresh_token: Secret | None = None  # a rotated refresh token, when IMS returned one

    @property
    def lifetime(self) -> float:
        return self.expires_at - self.issued_at


class ImsErrorKind(enum.Enum):
    PERMANENT = "permanent"  # needs a human: wrong secret, scope, grant; retried only slowly
    TRANSIENT = "transient"  # 5xx, network, malformed answer: back off and retry
    THROTTLED = "throttled"  # 429: wait Retry-After (or back off)


class ImsError(Exception):
    """A failed token request, classified. ``str()`` is safe to log: it holds the IMS error
    code and description, never request parameters."""

    def __init__(
        self,
        kind: ImsErrorKind,
        code: str,
        description: str = "",
        *,
        status: int | None = None,
        retry_after: float | None = None,
        debug_id: str | None = None,
    ) -> None:
        self.kind = kind
        self.code = code
        self.description = description
        self.status = status
        self.retry_after = retry_after
        #: IMS's ``x-debug-id`` for the failed answer (Adobe support asks for it); not in str()
        self.debug_id = debug_id
        msg = code if not description else f"{code}: {description}"
        if status is not None:
            msg = f"HTTP {status} {msg}"
        super().__init__(msg)


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """An HTTP request as produced by an auth flow; the I/O driver sends it."""

    method: str
    url: str
    form: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:  # the form carries the client secret
        return f"HttpRequest({self.method} {self.url})"


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """An HTTP response handed back to an auth flow by the I/O driver."""

    status: int
    headers: Mapping[str, str]  # lower-cased names
    body: bytes

    def __repr__(self) -> str:  # the body carries the access token
        return f"HttpResponse({self.status}, {len(self.body)} bytes)"
