"""The public plugin API of imsd: everything a plugin imports comes from this module.

A plugin is a module (or object) with functions marked ``@hookimpl`` whose names match the
hook specifications in :mod:`imsd.hookspecs`. It is registered through the ``imsd`` entry
point group, exactly like the built-in products in ``imsd_plugins``::

    [project.entry-points.imsd]
    myproduct = "my_package.imsd_plugin"

Hooks are synchronous and must be pure: they receive values and return values; the daemon
does all I/O. Plugin API version: :data:`PLUGIN_API_VERSION`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, runtime_checkable

import pluggy

__all__ = [
    "PLUGIN_API_VERSION",
    "PROJECT",
    "Product",
    "TokenView",
    "hookimpl",
    "hookspec",
]

PROJECT: Final = "imsd"
#: Bumped on a breaking change to a hook or to the types below.
PLUGIN_API_VERSION: Final = 1

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
    returns the normalized options (defaults filled in).
    """

    name: str
    default_scopes: tuple[str, ...]

    def validate_options(self, options: Mapping[str, Any]) -> Mapping[str, Any]: ...

    def headers(self, view: TokenView) -> dict[str, str]: ...

    def env(self, view: TokenView) -> dict[str, str]: ...

    def base_url(self, options: Mapping[str, Any]) -> str | None: ...
