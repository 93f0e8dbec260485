"""Options that products discover with the credential's own token
(:meth:`imsd.plugin.Product.discover`; Analytics 2.0's company id from ``/discovery/me``).

Theory of operation
-------------------
The supervisor calls :meth:`Discoveries.resolve` before it renders a credential's files: it
runs the discovery of every instance that needs one, with the token about to be written, and
returns the credential with the options found merged in (validated again by the product).
The answer is kept in memory for that version of the credential (the object: a changed file
is a new version, discovered again). A failure is kept for the token it was tried with, so
the next token tries again; the instance is then :class:`~imsd.render.Unresolved` and its
files are left out with the reason, which becomes the credential's error. Nothing here
raises and nothing drops a token.

The socket API renders from :meth:`Discoveries.resolved`, which never does I/O: until the
first discovery of a version has finished, the instances that need one are unresolved.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from imsd.model import (
    Credential,
    Grant,
    HttpRequest,
    HttpResponse,
    ImsError,
    ValidatedOptions,
    https_or_loopback,
)
from imsd.plugin import Discovery, Product
from imsd.render import RenderError, Unresolved, instances, token_view, validated_options

__all__ = ["Discoveries", "Send"]

Send = Callable[[HttpRequest], Awaitable[HttpResponse]]

#: Requests one discovery may make: a loop in a plugin ends here.
MAX_REQUESTS: Final = 4
PENDING: Final = "discovery has not finished yet (it runs after each new token of a credential)"


@dataclass(frozen=True, slots=True)
class _Entry:
    cred: Credential  # the version discovered
    failed_with: Grant | None  # a failure is tried again with the next token
    resolved: Credential


def _discovering(cred: Credential, products: Mapping[str, Product]) -> list[tuple[str, Product]]:
    return [
        (name, p)
        for name, p in instances(cred, products)
        if p is not None and callable(getattr(p, "discover", None))
    ]


class Discoveries:
    """The discovered options of every credential, in memory."""

    def __init__(self, send: Send | None) -> None:
        self._send = send
        self._entries: dict[str, _Entry] = {}

    def forget(self, name: str) -> None:
        self._entries.pop(name, None)

    def resolved(
        self, cred: Credential, grant: Grant, products: Mapping[str, Product]
    ) -> Credential:
        """*cred* with what was discovered for this version of it, without I/O: before its
        first discovery has finished, the instances that need one are unresolved."""
        entry = self._entries.get(cred.name)
        if entry is not None and entry.cred is cred:
            return entry.resolved
        pending: dict[str, Mapping[str, Any]] = {}
        for name, product in _discovering(cred, products):
            try:
                view = token_view(cred, grant, product, name)
                flow = product.discover(view)  # type: ignore[attr-defined]
            except RenderError:
                continue
            except Exception as e:
                pending[name] = Unresolved(view.options, _reason(e, view.access_token))
                continue
            if flow is not None:
                flow.close()  # only asked whether it is needed
                pending[name] = Unresolved(view.options, PENDING)
        if not pending:
            return cred
        options = ValidatedOptions({**cred.product_options, **pending})
        return dataclasses.replace(cred, product_options=options)

    async def resolve(
        self, cred: Credential, grant: Grant, products: Mapping[str, Product]
    ) -> Credential:
        """*cred* with its instances' discovered options, discovering what this version of
        it has not (or what failed with an older token)."""
        entry = self._entries.get(cred.name)
        if entry is not None and entry.cred is cred and entry.failed_with in (None, grant):
            return entry.resolved
        found: dict[str, Mapping[str, Any]] = {}
        failed = False
        for name, product in _discovering(cred, products):
            result = await self._discover(cred, grant, product, name)
            if result is not None:
                found[name] = result
                failed = failed or isinstance(result, Unresolved)
        resolved = cred
        if found:
            options = ValidatedOptions({**cred.product_options, **found})
            resolved = dataclasses.replace(cred, product_options=options)
        self._entries[cred.name] = _Entry(cred, grant if failed else None, resolved)
        return resolved

    async def _discover(
        self, cred: Credential, grant: Grant, product: Product, name: str
    ) -> Mapping[str, Any] | None:
        """The instance's options completed, Unresolved with the reason, or None when the
        product needs nothing for them."""
        try:
            view = token_view(cred, grant, product, name)
        except RenderError:
            return None  # its rendering reports the problem with the options
        token = view.access_token
        try:
            flow: Discovery | None = product.discover(view)  # type: ignore[attr-defined]
        except Exception as e:
            return Unresolved(view.options, _reason(e, token))
        if flow is None:
            return None
        try:
            found = await self._drive(flow)
            return validated_options(product, {**view.options, **found})
        except Exception as e:
            return Unresolved(view.options, _reason(e, token))
        finally:
            flow.close()

    async def _drive(self, flow: Discovery) -> Mapping[str, Any]:
        try:
            request = next(flow)
            for _ in range(MAX_REQUESTS):
                if not isinstance(request, HttpRequest) or not https_or_loopback(request.url):
                    raise _Failed("discovery asked for a URL that is not https")
                if self._send is None:
                    raise _Failed("discovery needs an HTTP client (none in this daemon)")
                request = flow.send(await self._send(request))
            raise _Failed(f"discovery made more than {MAX_REQUESTS} requests")
        except StopIteration as stop:
            if not isinstance(stop.value, Mapping):
                raise _Failed("discovery returned no options") from None
            return stop.value


class _Failed(Exception):
    """A discovery broke a rule of the plugin API (the message is the daemon's own)."""


def _reason(e: Exception, token: str) -> str:
    """A message fit for the credential's error: the plugin's own for a ValueError (with the
    token removed, should it quote it), the daemon's for a transport error, else the type."""
    if isinstance(e, ImsError):
        return f"discovery failed: {e}"
    if isinstance(e, _Failed):
        return str(e)
    if isinstance(e, ValueError | TypeError):
        text = str(e).replace(token, "<redacted>") if token else str(e)
        return " ".join(text.split())[:500] or type(e).__name__
    return f"discovery failed ({type(e).__name__})"
