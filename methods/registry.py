"""The one registry mechanism: methods, metrics, datasets, models and tasks each have a :class:`Registry`.

A name is registered once, where the thing is defined, together with its facts (a method class
carries its config and what it quantizes; a metric spec its unit, direction and tolerance; a
dataset its pinned files).  A registry knows which modules define its entries (``discover``: a
package whose modules are imported on first lookup) and imports the modules named in
``$QUANTBENCH_PLUGINS`` (comma-separated), so a user's own method or metric appears in
``quantbench ls`` and in every process of a distributed run without editing quantbench.

Lookups of unknown names raise :class:`ConfigError` with a did-you-mean hint and the valid names.
"""

from __future__ import annotations

import difflib
import importlib
import os
import pkgutil
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A user-facing configuration error (unknown name, bad parameter value)."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    choices = sorted(choices)
    close = difflib.get_close_matches(word, choices, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{hint}; valid: {', '.join(choices)}"


_PLUGINS_LOADED: set[str] = set()


def load_plugins() -> None:
    """Import the modules named in ``$QUANTBENCH_PLUGINS``; they register into any registry."""
    for mod in filter(None, (m.strip() for m in os.environ.get("QUANTBENCH_PLUGINS", "").split(","))):
        if mod not in _PLUGINS_LOADED:
            try:
                importlib.import_module(mod)
            except ModuleNotFoundError as e:
                if e.name and mod.startswith(e.name):  # the plugin itself (or its package) is not there
                    raise ConfigError(f"QUANTBENCH_PLUGINS: no module named '{mod}'") from None
                raise
            _PLUGINS_LOADED.add(mod)


class Registry(Generic[T]):
    """``name -> entry``; entries are added with :meth:`add` (or the :meth:`register` decorator).

    ``discover`` names packages whose modules define entries: they are imported, once, the first
    time the registry is read, so defining an entry in a new module of such a package is enough to
    register it (no second list of names to keep in sync).
    """

    def __init__(self, kind: str, discover: Iterable[str] = ()) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._discover = list(discover)
        self._discovered = False

    # -- writing --------------------------------------------------------------------------------
    def add(self, name: str, entry: T) -> T:
        old = self._entries.get(name)
        if old is not None and old is not entry and not _same(old, entry):
            raise RuntimeError(f"{self.kind} '{name}' registered twice")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""

        def deco(entry: T) -> T:
            return self.add(name, entry)

        return deco

    # -- reading --------------------------------------------------------------------------------
    def _load(self) -> None:
        if not self._discovered:
            self._discovered = True
            for pkg in self._discover:
                package = importlib.import_module(pkg)
                for info in pkgutil.iter_modules(package.__path__):
                    if not info.name.startswith("_"):
                        importlib.import_module(f"{pkg}.{info.name}")
        load_plugins()

    def get(self, name: str) -> T:
        if name not in self._entries:
            self._load()
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} '{name}'{did_you_mean(str(name), self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return sorted(self._entries.items())

    def __contains__(self, name: object) -> bool:
        if name not in self._entries:
            self._load()
        return name in self._entries

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


def _same(old: object, new: object) -> bool:
    """The same definition seen twice: a class or function of the same module-qualified name (its module
    imported again, e.g. by path in a test), or an equal value."""
    if isinstance(old, type) or callable(old):
        return _qualname(old) == _qualname(new)
    return old == new


def _qualname(obj: object) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
