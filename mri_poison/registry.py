"""A registry of named entries (attacks, protections) that the modules of one package add themselves to.

The package's modules are imported on first lookup, so adding an entry is adding a module: nothing lists them.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """entries by `entry.name`; `names()` in the order of `sort_key(entry)`; `get` names the choices on a miss."""

  def __init__(self, package: str, kind: str, sort_key: Callable[[T], Any]):
    self._package, self._kind, self._sort_key = package, kind, sort_key
    self._entries: dict[str, T] = {}
    self._loaded = False

  def add(self, entry: T) -> T:
    if entry.name in self._entries:
      raise ValueError(f"{self._kind} {entry.name!r} is registered twice")
    self._entries[entry.name] = entry
    return entry

  def registered(self) -> list[T]:
    """The entries added so far (without importing the package's modules)."""
    return list(self._entries.values())

  def entries(self) -> list[T]:
    if not self._loaded:
      self._loaded = True
      package = importlib.import_module(self._package)
      for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{self._package}.{module.name}")
    return sorted(self._entries.values(), key=self._sort_key)

  def names(self) -> tuple[str, ...]:
    return tuple(e.name for e in self.entries())

  def get(self, name: str) -> T:
    entries = self.entries()
    if name not in self._entries:
      raise ValueError(f"unknown {self._kind} {name!r}: expected one of {tuple(e.name for e in entries)}")
    return self._entries[name]
