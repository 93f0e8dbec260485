"""Hook specifications of the ``imsd`` pluggy project (plugin API 1.x,
:data:`imsd.plugin.PLUGIN_API_VERSION`).

Every hook is synchronous and called with keyword arguments; an implementation may accept any
subset of the arguments (pluggy passes only those it names), so adding an argument later is
not a breaking change. Implementations must not block: notification hooks run in a worker
thread, one implementation at a time, and an exception is logged with the plugin's name and
otherwise ignored.
"""

from __future__ import annotations

from imsd.plugin import AuthMethod, Product, hookspec


@hookspec
def imsd_products() -> list[Product]:  # type: ignore[empty-body]
    """Return the products this plugin provides.

    Called once at start-up. Each product's ``name`` must be unique across all plugins; a
    duplicate is reported and the later one (in entry-point name order) is skipped. A
    product's ``notice`` (e.g. a retirement warning) is logged once for each credential
    using it.

    .. versionadded:: API 1
    """


@hookspec
def imsd_auth_methods() -> list[AuthMethod]:  # type: ignore[empty-body]
    """Return the auth methods this plugin provides (a credential's ``auth`` field names one).

    Called once at start-up, like :func:`imsd_products`; a duplicate name is reported and the
    later one skipped. The built-ins ``oauth_server_to_server``, ``jwt`` and ``refresh_token``
    are registered this way.

    .. versionadded:: API 1
    """


@hookspec
def imsd_token_refreshed(credential: str, expires_at: float, output_dir: str) -> None:
    """A new token for *credential* was obtained and its files are written in *output_dir*.

    *expires_at* is Unix time. The token itself is in the files; read it from there if the
    plugin must forward it (and never log it).

    .. versionadded:: API 1
    """


@hookspec
def imsd_credential_failed(credential: str, error: str, state: str) -> None:
    """Obtaining or writing a token for *credential* failed. *error* is safe to log (it never
    contains a secret); *state* is the credential's state afterwards (``stale``, ``expired``,
    ``invalid``...).

    .. versionadded:: API 1
    """
