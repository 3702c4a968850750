"""Name registries for suites and methods, with "did you mean" errors.

Suites are light data and register on import of their module. Methods register with the
``@register_method`` decorator in their own module under ``methods/``; to list them without
importing torch, the modules are indexed by reading the decorator calls in their source (AST),
and a module is imported only when its method is asked for.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from cl_bench.errors import CLBenchError

T = TypeVar("T")


def unknown_name_error(kind: str, name: str, known: list[str]) -> CLBenchError:
    """An error for an unknown name, with the closest known names."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return CLBenchError(f"unknown {kind} {name!r}.{hint} Known: {', '.join(sorted(known))}.")


class Registry(Generic[T]):
    """A mapping from names to objects, filled by a decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name``."""

        def decorate(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise CLBenchError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return decorate

    def get(self, name: str) -> T:
        if name not in self._items:
            raise unknown_name_error(self.kind, name, list(self._items))
        return self._items[name]

    def names(self) -> list[str]:
        return list(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(self._items.values())


SUITES: Registry = Registry("suite")
METHODS: Registry = Registry("method")


def register_method(name: str) -> Callable[[T], T]:
    """Class decorator for a method plugin in ``methods/<module>.py``."""
    return METHODS.register(name)


@dataclass(frozen=True)
class MethodEntry:
    """A method found in the source of ``methods/`` without importing it."""

    name: str
    module: str
    summary: str


def index_methods() -> dict[str, MethodEntry]:
    """Methods declared by ``@register_method("...")`` in ``methods/*.py``, read from source."""
    import methods

    entries: dict[str, MethodEntry] = {}
    for info in pkgutil.iter_modules(methods.__path__):
        path = Path(methods.__path__[0]) / f"{info.name}.py"
        if not path.exists():
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ClassDef):
                for name in _registered_names(node):
                    summary = (ast.get_docstring(node) or "").split("\n")[0]
                    entries[name] = MethodEntry(name, f"methods.{info.name}", summary)
    return entries


def _registered_names(node: ast.ClassDef) -> list[str]:
    names = []
    for dec in node.decorator_list:
        if (
            isinstance(dec, ast.Call)
            and getattr(dec.func, "id", getattr(dec.func, "attr", None)) == "register_method"
            and dec.args
            and isinstance(dec.args[0], ast.Constant)
        ):
            names.append(dec.args[0].value)
    return names


def get_method(name: str) -> type:
    """The method class registered as ``name``, importing only its module."""
    entries = index_methods()
    if name not in entries:
        raise unknown_name_error("method", name, list(entries))
    importlib.import_module(entries[name].module)
    return METHODS.get(name)


def load_suites() -> Registry:
    """Import the suite definitions (light modules) and return the suite registry."""
    importlib.import_module("tasks.suites")
    return SUITES


def get_suite(name: str):
    """The suite registered as ``name``."""
    return load_suites().get(name)


def call_target(target: str, *args: object) -> object:
    """Import ``module:function`` and call it with ``args``."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)(*args)
