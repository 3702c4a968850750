"""Name registries for suites, methods and method-owned analyses, with "did you mean" errors.

Suites are light data and register on import of their module. Methods register with the
``@register_method`` decorator in their module (or package) under ``methods/``; to list them
without importing torch, the sources are indexed by reading the decorator calls (AST), and a
module is imported only when its method is asked for. A method's *variants* (ablations, baselines
that are the same algorithm with other option values) are data: ``variants.yaml`` files beside
the method's code, ``name: {base: <method>, summary: ..., options: {...}}``. Analyses a method
offers on its runs (``clbench analyze <name>``) register with ``@register_analysis``, indexed the
same way, so the core never imports a method.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Generic, TypeVar

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
ANALYSES: Registry = Registry("analysis")


LAUNCHERS = ("single", "ddp", "zero2", "zero3")


@dataclass(frozen=True)
class Capabilities:
    """What a method declares about itself (``@register_method(name, **capabilities)``, literal
    values only, so that listing methods reads them from source without importing torch)."""

    paper: str = ""  # the source paper, short citation
    trains: str = "a fresh LoRA on the language model + the projector each stage"
    growth: str = "none"  # what is kept per learned task (memory growth with the number of tasks)
    routes: bool = False  # inference routes per sample (so no plain merged checkpoint to serve)
    task_id: bool = False  # needs the task identity at test time (no registered method may)
    launchers: tuple[str, ...] = ("single",)  # verified launchers: single, ddp, zero2, zero3
    # config defaults the method's paper fixes for the method itself (dotted keys, e.g.
    # {"lora.rank": 128}); above the built-in defaults, below the suite's and the user's
    recipe: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.launchers) - set(LAUNCHERS))
        if unknown:
            raise CLBenchError(f"unknown launcher(s) {unknown}; known: {', '.join(LAUNCHERS)}")


def register_method(name: str, **capabilities: Any) -> Callable[[T], T]:
    """Class decorator for a method plugin in ``methods/``; keywords are its Capabilities."""
    declared = Capabilities(**capabilities)

    def decorate(cls: T) -> T:
        cls.capabilities = declared  # type: ignore[attr-defined]
        return METHODS.register(name)(cls)

    return decorate


def register_analysis(name: str) -> Callable[[T], T]:
    """Decorator for ``add_parser(subparsers)`` of a method-owned ``clbench analyze`` command.

    The decorated function adds its sub-parser and sets ``handler`` (a function of the parsed
    arguments) as its default; its module must import no heavy package at import time.
    """
    return ANALYSES.register(name)


@dataclass(frozen=True)
class MethodEntry:
    """A method (or a variant of one) found in ``methods/`` without importing it."""

    name: str
    module: str
    summary: str
    base: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    capabilities: Capabilities = field(default_factory=Capabilities)

    @property
    def label(self) -> str:
        if self.base is None:
            return self.name
        values = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.name} (= {self.base} with {values})"


@dataclass(frozen=True)
class MethodSpec:
    """A method ready to instantiate: its class and the option values its name implies."""

    name: str
    cls: type
    defaults: dict[str, Any] = field(default_factory=dict)

    def options(self, given: dict[str, Any]) -> Any:
        """The Options of a run: the variant's values, overridden by the run's ``method.*``."""
        from cl_bench.method import parse_options

        return parse_options(self.cls, {**self.defaults, **given})


def methods_root() -> Path:
    """The ``methods`` package's folder, found without importing it."""
    spec = importlib.util.find_spec("methods")
    if spec is None or not spec.submodule_search_locations:
        raise CLBenchError("the methods package is not installed beside cl_bench")
    return Path(list(spec.submodule_search_locations)[0])


def _sources() -> list[tuple[str, Path]]:
    """Every Python module under ``methods/`` (packages included), as (dotted name, path)."""
    root = methods_root()
    return [
        (".".join(("methods", *path.relative_to(root).with_suffix("").parts)), path)
        for path in sorted(root.rglob("*.py"))
        if path.name != "__init__.py"
    ]


def _decorated(decorator: str) -> Iterator[tuple[str, str, ast.AST]]:
    """(registered name, module, decorated node) for every ``@decorator("name")`` in methods/."""
    for module, path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ClassDef | ast.FunctionDef):
                for name in _registered_names(node, decorator):
                    yield name, module, node


@cache
def index_methods() -> dict[str, MethodEntry]:
    """Methods declared by ``@register_method("...")`` and variants in ``variants.yaml`` files."""
    entries: dict[str, MethodEntry] = {}
    for name, module, node in _decorated("register_method"):
        summary = (ast.get_docstring(node) or "").split("\n")[0]
        entries[name] = MethodEntry(name, module, summary,
                                    capabilities=_declared_capabilities(node, module))
    for path in sorted(methods_root().rglob("variants.yaml")):
        for name, variant in _read_variants(path).items():
            base = entries.get(variant["base"])
            if base is None or base.base is not None:
                raise CLBenchError(f"{path}: variant {name!r} names base {variant['base']!r}, "
                                   "which is no registered method")
            if name in entries:
                raise CLBenchError(f"{path}: variant {name!r} is registered twice")
            entries[name] = MethodEntry(name, base.module, variant["summary"], base.name,
                                        variant["options"], base.capabilities)
    return entries


def _declared_capabilities(node: ast.ClassDef | ast.FunctionDef, module: str) -> Capabilities:
    """The literal keywords of a ``@register_method(name, ...)`` decorator as Capabilities."""
    for dec in node.decorator_list:
        if isinstance(dec, ast.Call) and getattr(dec.func, "id", None) == "register_method":
            try:
                values = {k.arg: ast.literal_eval(k.value) for k in dec.keywords if k.arg}
                return Capabilities(**values)
            except (ValueError, TypeError) as err:
                raise CLBenchError(f"{module}: @register_method keywords must be literal "
                                   f"Capabilities fields: {err}") from None
    return Capabilities()


def _read_variants(path: Path) -> dict[str, dict]:
    """A variants file: ``name: {base, summary, options}`` for each variant, checked."""
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    for name, variant in data.items():
        if not isinstance(variant, dict) or set(variant) != {"base", "summary", "options"} \
                or not isinstance(variant["options"], dict):
            raise CLBenchError(f"{path}: variant {name!r} needs exactly the keys base, summary "
                               "and options (a mapping of option values)")
    return data


def _registered_names(node: ast.ClassDef | ast.FunctionDef, decorator: str) -> list[str]:
    names = []
    for dec in node.decorator_list:
        if (
            isinstance(dec, ast.Call)
            and getattr(dec.func, "id", getattr(dec.func, "attr", None)) == decorator
            and dec.args
            and isinstance(dec.args[0], ast.Constant)
        ):
            names.append(dec.args[0].value)
    return names


def get_method(name: str) -> MethodSpec:
    """The method (or variant) registered as ``name``, importing only its module."""
    entries = index_methods()
    if name not in entries:
        raise unknown_name_error("method", name, list(entries))
    entry = entries[name]
    importlib.import_module(entry.module)
    return MethodSpec(name, METHODS.get(entry.base or name), dict(entry.options))


@cache
def index_analyses() -> dict[str, str]:
    """Method-owned analyses: name -> ``module:function`` adding its ``clbench analyze`` parser."""
    return {name: f"{module}:{node.name}"
            for name, module, node in _decorated("register_analysis")}


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
