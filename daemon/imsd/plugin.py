"""The public plugin API of imsd: everything a plugin imports comes from this module.

A plugin is a module (or object) with functions marked ``@hookimpl`` whose names match the
hook specifications in :mod:`imsd.hookspecs`. It is registered through the ``imsd`` entry
point group, exactly like the built-in products in ``imsd_plugins``::

    [project.entry-points.imsd]
    myproduct = "my_package.imsd_plugin"

Hooks are synchronous and must be pure: they receive values and return values; the daemon
does all I/O. Products (:class:`Product`) describe an Adobe API's header conventions; auth
methods (:class:`AuthMethod`) describe how a credential becomes a token, as a generator flow
over :class:`HttpRequest`/:class:`HttpResponse` values that the daemon drives.

The API's version is :data:`PLUGIN_API_VERSION`, ``"MAJOR.MINOR"``: a minor version adds to
the API (a plugin written for an older one keeps working), a major version changes or
removes something. A plugin that needs a version declares it with a module (or plugin
object) attribute ``requires_api = "1.2"``; the daemon refuses it, naming both versions,
when its major version differs from the daemon's or its minor version is newer, and keeps
loading the others. What each version added:

1.0
    The hooks of :mod:`imsd.hookspecs`, :class:`Product`, :class:`AuthMethod`.
1.1
    The optional product members ``base_urls`` and ``discover`` (with :data:`Discovery`),
    :func:`https_or_loopback`.
1.2
    :class:`CredentialView`, what :meth:`AuthMethod.flow` receives (it received the daemon's
    internal credential, whose fields it keeps the names of); :class:`HasNotice`, declaring
    the optional ``notice`` of products and auth methods; ``requires_api``.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, runtime_checkable

import pluggy

from imsd.flows import (
    CredentialView,
    Flow,
    classify_error,
    expires_in_unit,
    parse_token_response,
)
from imsd.model import (
    Grant,
    HttpRequest,
    HttpResponse,
    ImsError,
    ImsErrorKind,
    Secret,
    https_or_loopback,
)

__all__ = [
    "PLUGIN_API_VERSION",
    "PROJECT",
    "AuthMethod",
    "CredentialView",
    "Discovery",
    "Flow",
    "Grant",
    "HasNotice",
    "HttpRequest",
    "HttpResponse",
    "ImsError",
    "ImsErrorKind",
    "Product",
    "Secret",
    "SecretSource",
    "TokenView",
    "classify_error",
    "expires_in_unit",
    "hookimpl",
    "hookspec",
    "https_or_loopback",
    "parse_token_response",
]

PROJECT: Final = "imsd"
#: ``"MAJOR.MINOR"``: the minor version grows with each addition to the API, the major one
#: on a change that can break a plugin; ``requires_api`` is checked against it at load.
#:
#: .. versionchanged:: API 1.2 a string (it was the integer 1)
PLUGIN_API_VERSION: Final = "1.2"

#: A product's discovery (:meth:`Product.discover`): a generator that yields the requests to
#: send, receives each answer, and returns the options it found.
Discovery = Generator[HttpRequest, HttpResponse, Mapping[str, Any]]

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass(frozen=True, slots=True)
class TokenView:
    """What a product sees of a credential and its current token.

    ``options`` are the product's own options from the credential file (``[product.NAME]``),
    already validated by :meth:`Product.validate_options`.
    """

    credential: str
    access_token: str
    token_type: str
    client_id: str
    org_id: str
    expires_at: float
    options: Mapping[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # never print the token
        return f"TokenView(credential={self.credential!r}, client_id={self.client_id!r})"


@runtime_checkable
class Product(Protocol):
    """An Adobe product's header conventions.

    ``validate_options`` raises :class:`ValueError` with a message naming the option; it
    returns the normalized options (defaults filled in). ``base_url`` is the root of the
    product's API for those options (None: no fixed host, as for ``generic``); the daemon
    publishes it as ``ADOBE_BASE_URL`` in the env file and ``base_url`` in ``token.json`` and
    the socket's headers answer, so a product's ``env`` need not set it. ``default_scopes``
    are the scopes a credential for the product usually needs: ``imsd check`` and
    ``imsd import`` name the ones a credential lacks (a hint, never an error).

    Optional members (a product without them is unchanged; typing has no optional protocol
    members, so they are not declared below, where a type checker would require them):

    ``notice: str | None`` (:class:`HasNotice`)
        Logged once for each credential using the product (e.g. a retirement). Checked at
        load: a notice that is not a string or None rejects the plugin.

        .. versionchanged:: API 1.2 declared by :class:`HasNotice` and checked at load

    ``base_urls(options) -> Mapping[str, str]``
        Other APIs of the product that live under another root, by a short name
        (``[a-z0-9_]``): published next to ``base_url`` (``base_urls`` in ``token.json``,
        ``ADOBE_<NAME>_BASE_URL`` in the env file). Journey Optimizer's Capping and
        Throttling APIs (``/journey/orchestration``) are ``ajo``'s ``journey``.

        .. versionadded:: API 1.1 (an optional addition: API 1 products are unaffected)

    ``discover(view) -> Discovery | None``
        Options that can be looked up with the token itself (Analytics 2.0's company id,
        from ``/discovery/me``). Return None when ``view.options`` need nothing; else a
        :data:`Discovery` generator: it yields :class:`HttpRequest` values, the daemon sends
        each one (https, or http to loopback only; same client, caps and timeouts as IMS
        requests) and sends back the :class:`HttpResponse`; it returns the options found,
        which are merged into the instance's and validated again by ``validate_options``.
        It raises :class:`ValueError` with a message for the user (several companies, none,
        an HTTP error) that never holds the token. The daemon runs it after the first token
        of each version of the credential and keeps the answer in memory; until it has one,
        and after a failure (tried again with the next token), the instance has no headers
        or env file and the credential shows the error.

        .. versionadded:: API 1.1 (an optional addition: API 1 products are unaffected)
    """

    name: str
    default_scopes: tuple[str, ...]

    def validate_options(self, options: Mapping[str, Any]) -> Mapping[str, Any]: ...

    def headers(self, view: TokenView) -> dict[str, str]: ...

    def env(self, view: TokenView) -> dict[str, str]: ...

    def base_url(self, options: Mapping[str, Any]) -> str | None: ...


@runtime_checkable
class HasNotice(Protocol):
    """The optional member of a :class:`Product` or an :class:`AuthMethod` that the daemon
    logs once for each credential using it (a retirement, a deprecation); None: nothing to
    say. The daemon reads it where ``isinstance(obj, HasNotice)``; a class may list it among
    its bases with the other protocol to say it has one.

    .. versionadded:: API 1.2 (before, an undeclared ``notice`` attribute was read)
    """

    notice: str | None


class SecretSource(Protocol):
    """How an auth method reads the secrets its fields name. Each raises :class:`ValueError`
    with a message fit for the user (never the value). Every value read counts towards the
    credential's change digest, so editing a key file is noticed like editing the credential.
    """

    def file(self, name: str, field: str) -> Secret:
        """The content of file *name* (absolute, relative to the credential file, or found
        in ``$CREDENTIALS_DIRECTORY``), without its trailing newline."""
        ...

    def env(self, name: str, field: str) -> Secret:
        """The value of environment variable *name*."""
        ...

    def value(self, value: str, field: str) -> Secret:
        """A secret given inline in the credential file."""
        ...


@runtime_checkable
class AuthMethod(Protocol):
    """A way of obtaining an access token, chosen by a credential's ``auth`` field.

    ``fields`` names the credential-file fields this method adds to the common ones
    (``client_id``, ``client_secret``, ``org_id``, ``scopes``, ``ims_url``...); any other
    field is an error. ``validate`` receives the whole table (common fields normalized,
    ``scopes`` a tuple) and returns the method's options, which the flow later finds in
    ``view.options``; it raises :class:`ValueError` naming the field
    (``"private_key_file: ..."``). ``flow`` is a generator: it yields the requests to send
    and returns a :class:`Grant`. *view* is what the flow may know of the credential (a
    :class:`CredentialView`). *refresh_token* is the newest refresh token the daemon holds
    for the credential (persisted across restarts), or None; a flow that rotates refresh
    tokens returns the new one in ``Grant.refresh_token``. An optional ``notice`` member
    (:class:`HasNotice`) is logged for every credential using the method (e.g. a
    deprecation).

    .. versionchanged:: API 1.2 ``flow`` receives a :class:`CredentialView` (before: the
       daemon's credential, whose fields an auth method used keep their names in the view)
    """

    name: str
    fields: frozenset[str]

    def validate(self, table: Mapping[str, Any], secrets: SecretSource) -> Mapping[str, Any]: ...

    def flow(self, view: CredentialView, now: float, refresh_token: Secret | None) -> Flow: ...
