"""Loading plugins: the ``imsd`` entry point group into one pluggy ``PluginManager``.

Each entry point is loaded in its own ``try``: a plugin that fails to import, registers a
misspelled hook or returns a malformed product is recorded with its error and skipped, and
every other plugin keeps working; so is one that needs a newer plugin API
(``requires_api``, :data:`imsd.plugin.PLUGIN_API_VERSION`). Built-in products arrive through
the same entry points as a third party's; nothing here knows their names.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import pluggy
import structlog

from imsd import hookspecs
from imsd.model import Credential, CredentialError, ValidatedOptions
from imsd.plugin import PLUGIN_API_VERSION, PROJECT, AuthMethod, HasNotice, Product
from imsd.render import validated_options

__all__ = ["PluginInfo", "Registry", "api_version", "load_registry", "validate_products"]

log = structlog.get_logger("imsd.registry")

_VERSION: Final = re.compile(r"([0-9]{1,4})(?:\.([0-9]{1,4}))?")


def api_version(text: object) -> tuple[int, int]:
    """``"MAJOR.MINOR"`` (or ``"MAJOR"``) as a pair, else ValueError."""
    match = _VERSION.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f'requires_api must be a "MAJOR.MINOR" string, not {text!r:.40}')
    return int(match[1]), int(match[2] or 0)


def _api_problem(plugin: object, name: str) -> str | None:
    """Why *plugin* cannot run on this plugin API (its ``requires_api``), or None."""
    wanted = getattr(plugin, "requires_api", None)  # optional: older plugins lack it
    if wanted is None:
        return None
    need = api_version(wanted)
    have = api_version(PLUGIN_API_VERSION)
    if need[0] == have[0] and need[1] <= have[1]:
        return None
    fix = "upgrade imsd" if need > have else "use a version of the plugin written for it"
    return (
        f"plugin {name!r} needs plugin API {need[0]}.{need[1]}; this imsd provides "
        f"{PLUGIN_API_VERSION}: {fix}"
    )


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """What ``imsd plugins`` shows for one plugin; ``error`` is set when it was skipped."""

    name: str
    version: str
    source: str
    products: tuple[str, ...] = ()
    error: str | None = None
    auth_methods: tuple[str, ...] = ()


@dataclass(slots=True)
class Registry:
    """The loaded plugins, and the products and auth methods they provide, by name."""

    manager: pluggy.PluginManager
    products: dict[str, Product] = field(default_factory=dict)
    auth_methods: dict[str, AuthMethod] = field(default_factory=dict)
    plugins: list[PluginInfo] = field(default_factory=list)

    @property
    def errors(self) -> list[PluginInfo]:
        return [p for p in self.plugins if p.error is not None]

    def implemented(self, hook: str) -> bool:
        """Whether any plugin implements *hook* (no thread hop for a hook nobody wants)."""
        return bool(getattr(self.manager.hook, hook).get_hookimpls())

    def notify(self, hook: str, /, **kwargs: Any) -> None:
        """Call every implementation of notification *hook*, isolating each: a plugin that
        raises is logged by name and the others still run. Blocking; call it in a thread."""
        for impl in getattr(self.manager.hook, hook).get_hookimpls():
            try:
                impl.function(**{k: v for k, v in kwargs.items() if k in impl.argnames})
            except Exception as e:
                log.error(
                    "plugin.hook_failed", plugin=impl.plugin_name, hook=hook, error=_describe(e)
                )


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _valid_notice(kind: str, obj: Product | AuthMethod) -> str | None:
    if not isinstance(obj, HasNotice) or obj.notice is None or isinstance(obj.notice, str):
        return None
    return f"{kind} {obj.name!r}: notice must be a string or None"


def _valid_product(obj: object) -> str | None:
    """Why *obj* is not a usable product, or None."""
    if not isinstance(obj, Product):
        return f"{type(obj).__name__} does not implement the Product protocol"
    if not isinstance(obj.name, str) or not obj.name:
        return "product name must be a non-empty string"
    if not isinstance(obj.default_scopes, tuple):
        return f"product {obj.name!r}: default_scopes must be a tuple of strings"
    return _valid_notice("product", obj)


def _valid_auth(obj: object) -> str | None:
    if not isinstance(obj, AuthMethod):
        return f"{type(obj).__name__} does not implement the AuthMethod protocol"
    if not isinstance(obj.name, str) or not obj.name:
        return "auth method name must be a non-empty string"
    if not isinstance(obj.fields, frozenset):
        return f"auth method {obj.name!r}: fields must be a frozenset of field names"
    return _valid_notice("auth method", obj)


def _collect(pm: pluggy.PluginManager, plugin: object, hook: str, check: Any) -> list[Any]:
    found: list[Any] = []
    for impl in getattr(pm.hook, hook).get_hookimpls():
        if impl.plugin is not plugin:
            continue
        for obj in impl.function() or ():
            why = check(obj)
            if why is not None:
                raise TypeError(why)
            found.append(obj)
    return found


def _register(reg: Registry, plugin: object, name: str, version: str, source: str) -> None:
    pm = reg.manager
    try:
        problem = _api_problem(plugin, name)
    except ValueError as e:
        problem = f"plugin {name!r}: {e}"
    if problem is not None:  # before its hooks run: they may use what this imsd lacks
        reg.plugins.append(PluginInfo(name, version, source, error=problem))
        log.error("plugin.rejected", plugin=name, source=source, error=problem)
        return
    try:
        pm.register(plugin, name=name)
    except Exception as e:  # a hook with a wrong signature fails here
        reg.plugins.append(PluginInfo(name, version, source, error=_describe(e)))
        log.error("plugin.rejected", plugin=name, source=source, error=_describe(e))
        return
    try:
        pm.check_pending()  # a misspelled hook name would otherwise be silently ignored
        products: list[Product] = _collect(pm, plugin, "imsd_products", _valid_product)
        methods: list[AuthMethod] = _collect(pm, plugin, "imsd_auth_methods", _valid_auth)
    except Exception as e:
        pm.unregister(plugin)
        reg.plugins.append(PluginInfo(name, version, source, error=_describe(e)))
        log.error("plugin.rejected", plugin=name, source=source, error=_describe(e))
        return
    names: list[str] = []
    for product in products:
        if product.name in reg.products:
            log.error("plugin.duplicate_product", plugin=name, product=product.name)
            continue
        reg.products[product.name] = product
        names.append(product.name)
    auths: list[str] = []
    for method in methods:
        if method.name in reg.auth_methods:
            log.error("plugin.duplicate_auth_method", plugin=name, auth=method.name)
            continue
        reg.auth_methods[method.name] = method
        auths.append(method.name)
    reg.plugins.append(PluginInfo(name, version, source, tuple(names), None, tuple(auths)))
    log.debug("plugin.loaded", plugin=name, products=names, auth_methods=auths)


def _entry_points() -> Iterable[md.EntryPoint]:
    return sorted(md.entry_points(group=PROJECT), key=lambda ep: ep.name)


def load_registry(
    *,
    entry_points: bool = True,
    extra: Mapping[str, object] | None = None,
    plugin_dirs: Sequence[Path] = (),
) -> Registry:
    """Load every ``imsd`` entry point (and *extra* plugin objects, by name), skipping broken
    ones. Entry points load in name order so duplicate resolution is deterministic."""
    reg = Registry(_new_manager())
    if entry_points:
        for ep in _entry_points():
            dist = ep.dist
            version = dist.version if dist is not None else "?"
            source = f"{dist.name if dist is not None else '?'}:{ep.value}"
            try:
                plugin = ep.load()
            except Exception as e:
                reg.plugins.append(PluginInfo(ep.name, version, source, error=_describe(e)))
                log.error("plugin.import_failed", plugin=ep.name, source=source, error=_describe(e))
                continue
            _register(reg, plugin, ep.name, version, source)
    for directory in plugin_dirs:
        for path in sorted(directory.glob("*.py")):
            name = path.stem
            try:
                plugin = _load_file(path)
            except Exception as e:  # a local plugin's import error must not stop the others
                reg.plugins.append(PluginInfo(name, "local", str(path), error=_describe(e)))
                log.error("plugin.import_failed", plugin=name, source=str(path), error=_describe(e))
                continue
            _register(reg, plugin, name, "local", str(path))
    for name, plugin in (extra or {}).items():
        source = plugin.__name__ if isinstance(plugin, ModuleType) else type(plugin).__name__
        _register(reg, plugin, name, "local", source)
    return reg


def _load_file(path: Path) -> ModuleType:
    """Import a local plugin module (``plugin_dirs``) under a private name."""
    module_name = f"imsd_local_plugins.{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def scope_hints(cred: Credential, products: Mapping[str, Product]) -> list[str]:
    """One line for each product of *cred* whose ``default_scopes`` it does not all request:
    a hint for ``imsd check`` and ``imsd import``, never an error (the Developer Console
    decides what a credential may request, and IMS refuses a scope it was not granted)."""
    have = set(cred.scopes)
    hints: list[str] = []
    for kind in cred.products:
        product = products.get(kind)
        missing = [s for s in product.default_scopes if s not in have] if product else []
        if missing:
            hints.append(
                f"{cred.name}: product {kind!r} usually needs scopes {', '.join(missing)}, "
                "not in scopes; if its API refuses the token, add them in the Developer "
                "Console and to scopes"
            )
    return hints


def validate_products(cred: Credential, products: Mapping[str, Product]) -> Credential:
    """Check the credential's products and instances exist and their options are valid;
    return the credential with normalized options as :class:`~imsd.model.ValidatedOptions`
    (keyed by instance), which rendering then uses without validating again (options already
    validated are kept as they are). Errors name the file and the instance or option."""
    given = cred.product_options
    done = given if isinstance(given, ValidatedOptions) else {}
    options = ValidatedOptions()
    known = ", ".join(sorted(products)) or "none loaded"
    for name, kind in cred.product_instances:
        where = f"product.{name}"
        product = products.get(kind)
        if product is None and name == kind:
            raise CredentialError(
                cred.path,
                f"unknown product {name!r} (known: {known}; an instance of a product needs"
                f' [product.{name}] type = "PRODUCT")',
                field="products",
            )
        if product is None:
            raise CredentialError(
                cred.path, f"type: unknown product {kind!r} (known: {known})", field=where
            )
        if name != kind and name in products:
            raise CredentialError(
                cred.path,
                f"type: {name!r} is a product itself; give the instance a name of its own",
                field=where,
            )
        if name in done:
            options[name] = done[name]
            continue
        try:
            options[name] = validated_options(product, given.get(name, {}))
        except (ValueError, TypeError) as e:
            raise CredentialError(cred.path, str(e), field=where) from None
    return replace(cred, product_options=options)
