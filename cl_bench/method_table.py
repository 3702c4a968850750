"""``docs/methods.md``, generated from the registry: every method's declared capabilities
(``@register_method``), its variants and its options (the Options dataclass: fields, defaults and
the docstring under each field). ``clbench list --markdown > docs/methods.md`` rewrites it; a test
fails when the committed file is stale.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from typing import Any

from cl_bench.registry import MethodEntry, get_method, index_methods

COMMAND = "python -m cl_bench.cli list --markdown > docs/methods.md"


def option_docs(options: type) -> dict[str, str]:
    """The docstring written under each field of an Options dataclass (or of the Options
    dataclass it extends), by field name."""
    docs: dict[str, str] = {}
    for cls in reversed(options.__mro__):
        if dataclasses.is_dataclass(cls):
            docs |= own_option_docs(cls)
    return docs


def own_option_docs(options: type) -> dict[str, str]:
    """The docstrings under the fields one Options class defines itself."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(options)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for field, after in zip(body, body[1:], strict=False):
        if (isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[field.target.id] = " ".join(after.value.value.split())
    return docs


def option_rows(options: type) -> list[tuple[str, Any, str]]:
    """(name, default, docstring) of every option of an Options dataclass."""
    docs = option_docs(options)
    rows = []
    for field in dataclasses.fields(options):
        default = (field.default_factory() if field.default_factory is not dataclasses.MISSING
                   else field.default)
        rows.append((field.name, default, docs.get(field.name, "")))
    return rows


def cell(text: object) -> str:
    return str(text).replace("|", "\\|")


def code(value: object) -> str:
    return f"`{value}`"


def capability_rows(entries: list[MethodEntry]) -> list[str]:
    rows = ["| method | paper | trains | kept per task | routes per sample | task id at test "
            "| launchers |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for e in entries:
        c = e.capabilities
        rows.append("| " + " | ".join([
            code(e.name), cell(c.paper), cell(c.trains), cell(c.growth),
            "yes" if c.routes else "no", "yes" if c.task_id else "no",
            ", ".join(c.launchers),
        ]) + " |")
    return rows


def variant_rows(entries: list[MethodEntry]) -> list[str]:
    rows = ["| variant | of | options | what |", "| --- | --- | --- | --- |"]
    for e in entries:
        values = ", ".join(f"{k}={v}" for k, v in e.options.items())
        rows.append(f"| {code(e.name)} | {code(e.base)} | {cell(values)} | {cell(e.summary)} |")
    return rows


def options_section(entry: MethodEntry) -> list[str]:
    rows = option_rows(get_method(entry.name).cls.Options)
    lines = [f"### {code(entry.name)}", "", entry.summary, ""]
    if not rows:
        return [*lines, "No options.", ""]
    lines += ["| option | default | what |", "| --- | --- | --- |"]
    lines += [f"| {code(name)} | {code(default)} | {cell(doc)} |" for name, default, doc in rows]
    return [*lines, ""]


def methods_markdown() -> str:
    """The whole of docs/methods.md."""
    entries = sorted(index_methods().values(), key=lambda e: e.name)
    methods = [e for e in entries if e.base is None]
    variants = [e for e in entries if e.base is not None]
    lines = [
        "# Methods", "",
        f"Generated from the registry by `{COMMAND}`: do not edit by hand. Each method declares "
        "its capabilities in `@register_method` and its options in an `Options` dataclass "
        "(a docstring under each field); set an option with `--set method.<option>=<value>`. "
        "Which baseline each paper uses, and the equations behind them: "
        "[baselines](baselines.md), [LLaVA-c](llava_c.md), [HiDe-LLaVA](hide_llava.md).", "",
        "*kept per task*: what a method keeps for every task learned (its memory growth with "
        "the number of tasks); *routes per sample*: inference picks weights per input, so there "
        "is no single merged checkpoint to serve; *task id at test*: whether inference needs "
        "the task identity (no method may); *launchers*: how it may run (single: one process; "
        "ddp: torchrun / --nproc; zero2: DeepSpeed ZeRO 0-2), declared from what it does "
        "between steps, others refused up front (docs/gpu.md).", "",
        *capability_rows(methods), "",
        "## Variants", "",
        "A variant is a method run with other option values (`variants.yaml` beside the "
        "method).", "",
        *variant_rows(variants), "",
        "## Options", "",
    ]
    for entry in methods:
        lines += options_section(entry)
    return "\n".join(lines).rstrip() + "\n"
