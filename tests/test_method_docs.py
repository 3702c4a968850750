"""docs/methods.md is generated from the registry and must not go stale; clbench list shows
every method's declared capabilities."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cl_bench.cli import main
from cl_bench.method_table import COMMAND, methods_markdown, option_rows
from cl_bench.registry import get_method, index_methods

DOCS = Path(__file__).resolve().parents[1] / "docs" / "methods.md"


def test_docs_methods_md_is_the_registry_as_it_is() -> None:
    assert DOCS.read_text() == methods_markdown(), (
        f"docs/methods.md is stale: regenerate it with `{COMMAND}`")


@dataclass
class Documented:
    size: int = 3
    """How many."""
    names: list[str] = field(default_factory=lambda: ["a"])
    undocumented: float | None = None
    mode: str = "x"
    """Spread
    over lines."""


def test_option_rows_read_defaults_and_the_docstring_under_each_field() -> None:
    assert option_rows(Documented) == [
        ("size", 3, "How many."), ("names", ["a"], ""), ("undocumented", None, ""),
        ("mode", "x", "Spread over lines."),
    ]


def test_every_method_option_has_a_docstring() -> None:
    missing = [
        f"{name}.{option}"
        for name, entry in index_methods().items() if entry.base is None
        for option, _, doc in option_rows(get_method(name).cls.Options) if not doc
    ]
    assert not missing, f"write a docstring under these Options fields: {missing}"


def test_list_shows_the_declared_capabilities(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("seq_lora", "lwf", "ewc", "olora", "replay", "finetune", "hide_llava"):
        assert f"  {name}: " in out
    assert "per task: one LoRA per task kept (all summed at inference" in out
    assert "routes per sample" in out and "no task id at test" in out
    assert "paper: EWC (Kirkpatrick et al., PNAS 2017), eq. 3" in out
    assert main(["list", "--markdown"]) == 0
    assert capsys.readouterr().out == DOCS.read_text()
