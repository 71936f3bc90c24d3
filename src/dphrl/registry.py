"""One registry idiom for every name a user writes in a config.

Divergences, policy losses, loss aggregations, advantage estimators, KL estimators, rewards,
generation engines and algorithms are each a :class:`Registry`: register with a decorator
(``@POLICY_LOSSES.register("ppo_clip")``), look up with :meth:`Registry.get`, whose error names the
config key and lists the valid names, and reach user code from YAML as ``package.module:attr``
(e.g. ``divergence: my_pkg.divs:my_f``) without registering anything.

A registry is a mutable mapping ``name -> object``, so ``name in REG``, ``REG[name]``,
``sorted(REG)`` and ``monkeypatch.setitem(REG, ...)`` work as on a dict.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, Generic, TypeVar

from dphrl.errors import UserError

T = TypeVar("T")
_MISSING = object()

__all__ = ["Registry", "RegistryError", "config_params", "import_object", "kwargs_from_config"]


class RegistryError(UserError, ValueError):
    """An unknown name, or a ``package.module:attr`` that cannot be imported or is the wrong kind of
    object; the message names the config key and the valid names."""


def import_object(spec: str, what: str = "object") -> Any:
    """``package.module:attr`` -> the attribute (dotted attributes allowed), or ValueError saying why."""
    mod, _, attr = spec.partition(":")
    if not mod or not attr:
        raise RegistryError(f"{what} {spec!r}: expected 'package.module:attr'")
    try:
        obj: Any = importlib.import_module(mod)
    except ImportError as e:
        raise RegistryError(
            f"{what} {spec!r}: cannot import module {mod!r} ({e}); is it on PYTHONPATH?"
        ) from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise RegistryError(
                f"{what} {spec!r}: cannot import {attr!r} from module {mod!r} (no such attribute)"
            ) from e
    return obj


class Registry(MutableMapping, Generic[T]):
    """Names (as written in configs) -> objects, with ``module:attr`` for user code.

    ``kind`` names the thing in messages ("divergence"); ``config_key`` the config field that takes
    it; ``builtin_modules`` are imported on first lookup so that modules which register themselves
    (rewards, engines) are found without importing them eagerly; ``adapt`` turns an object imported
    by ``module:attr`` into what the registry holds (e.g. a bare generator function into a
    :class:`dphrl.divergences.Divergence`) and may raise ValueError for a wrong kind of object.
    """

    def __init__(
        self,
        kind: str,
        *,
        config_key: str | None = None,
        builtin_modules: tuple[str, ...] = (),
        adapt: Callable[[Any], T] | None = None,
    ) -> None:
        self.kind = kind
        self.config_key = config_key
        self._items: dict[str, T] = {}
        self._builtin_modules = builtin_modules
        self._loaded = not builtin_modules
        self._adapt = adapt

    # --- mapping protocol (built-ins loaded lazily) ------------------------------------------------
    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for mod in self._builtin_modules:
                importlib.import_module(mod)

    def __getitem__(self, name: str) -> T:
        self._load()
        return self._items[name]

    def __setitem__(self, name: str, obj: T) -> None:
        self._items[name] = obj

    def __delitem__(self, name: str) -> None:
        del self._items[name]

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(self._items)

    def __len__(self) -> int:
        self._load()
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self)})"

    # --- the idiom -----------------------------------------------------------------------------------
    def register(self, name: str, obj: T | None = None, *, overwrite: bool = False) -> Any:
        """Register ``obj`` under ``name``; without ``obj``, a decorator. Re-registering a name needs
        ``overwrite=True`` (a silent replacement would change what a config means)."""

        def deco(o: T) -> T:
            if name in self._items and not overwrite and self._items[name] is not o:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered; pass overwrite=True to replace it"
                )
            self._items[name] = o
            return o

        return deco(obj) if obj is not None else deco

    def names(self) -> list[str]:
        """Registered names, sorted (what the error messages list)."""
        return sorted(self)

    def get(self, name: str, default: Any = _MISSING) -> T:
        """The object registered as ``name`` or imported from ``package.module:attr``.

        Unknown names raise ValueError naming the config key, listing the valid names and the
        closest matches; with ``default`` given, a missing registered name returns it (as
        ``dict.get``).
        """
        if default is not _MISSING and (not isinstance(name, str) or ":" not in name):
            self._load()
            return self._items.get(name, default)
        if not isinstance(name, str):
            raise RegistryError(self._unknown(name))
        if ":" in name:
            where = f"config key '{self.config_key}': " if self.config_key else ""
            try:
                obj = import_object(name, self.kind)
                return self._adapt(obj) if self._adapt is not None else obj
            except ValueError as e:
                raise RegistryError(f"{where}{e}") from e
        self._load()
        if name not in self._items:
            raise RegistryError(self._unknown(name))
        return self._items[name]

    def _unknown(self, name: object) -> str:
        where = f"config key '{self.config_key}': " if self.config_key else ""
        close = difflib.get_close_matches(str(name), self.names(), n=2)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return (f"{where}unknown {self.kind} {name!r}; valid names: {self.names()} or 'package.module:attr' "
                f"for your own.{hint}")


def config_params(**mapping: str) -> Callable[[T], T]:
    """Decorator for a registered function: its keyword ``param`` takes the value of config key
    ``mapping[param]`` (e.g. ``@config_params(k="passk_k")``). The trainer passes exactly these, so a
    new entry with a new hyper-parameter is the entry plus its config field, nothing in the loop."""

    def deco(fn: T) -> T:
        fn.config_params = dict(mapping)  # type: ignore[attr-defined]
        return fn

    return deco


def kwargs_from_config(fn: Any, cfg: Any) -> dict[str, Any]:
    """The keyword arguments ``fn`` declared with :func:`config_params`, read from ``cfg``."""
    return {param: getattr(cfg, key) for param, key in getattr(fn, "config_params", {}).items()}
