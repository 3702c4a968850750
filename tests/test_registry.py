import subprocess
import sys

import pytest

from cl_bench.errors import CLBenchError
from cl_bench.registry import Registry, get_method, get_suite, index_methods


def test_unknown_names_suggest_close_ones() -> None:
    with pytest.raises(CLBenchError, match="Did you mean 'ucit-micro'"):
        get_suite("ucit-mikro")
    with pytest.raises(CLBenchError, match="Did you mean 'finetune'"):
        get_method("fintune")


def test_double_registration_is_an_error() -> None:
    reg: Registry = Registry("thing")
    reg.register("a")(1)
    with pytest.raises(CLBenchError, match="registered twice"):
        reg.register("a")(2)


def test_methods_are_indexed_without_importing_them() -> None:
    code = (
        "import sys; from cl_bench.registry import index_methods, load_suites; "
        "names = index_methods(); load_suites(); "
        "assert 'finetune' in names and 'zeroshot' in names and 'multitask' in names; "
        "assert 'torch' not in sys.modules, 'listing imported torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_indexed_method_registers_under_its_name() -> None:
    for name in index_methods():
        assert get_method(name).cls.__name__


def test_order_by_letters_and_names() -> None:
    suite = get_suite("ucit")
    assert [t.letter for t in suite.resolve_order("AIRFCV")] == list("AIRFCV")
    assert [t.name for t in suite.resolve_order("IconQA,ArxivQA")] == ["IconQA", "ArxivQA"]
    with pytest.raises(CLBenchError, match="twice"):
        suite.resolve_order("IconQA,IconQA")
    with pytest.raises(CLBenchError, match="unknown task"):
        suite.resolve_order("IconQA,Nope")


def test_variants_are_data_resolved_onto_their_base_method() -> None:
    entries = index_methods()
    assert entries["modelmix"].base == "llava_c"
    assert entries["modelmix"].module == entries["llava_c"].module
    spec = get_method("modelmix")
    assert spec.cls is get_method("llava_c").cls
    options = spec.options({})
    assert (options.consolidation, options.uir) == ("modelmix", "none")
    assert spec.options({"uir": "mse"}).uir == "mse"  # the run's options win over the variant's


def test_a_malformed_variants_file_names_the_file(tmp_path, monkeypatch) -> None:
    from cl_bench import registry

    package = tmp_path / "methods"
    (package / "toy").mkdir(parents=True)
    (package / "toy" / "method.py").write_text(
        'from cl_bench.registry import register_method\n\n\n@register_method("toy")\n'
        'class Toy:\n    """A toy."""\n'
    )
    (package / "toy" / "variants.yaml").write_text("toy_b:\n  base: toy\n  options: {a: 1}\n")
    monkeypatch.setattr(registry, "methods_root", lambda: package)
    registry.index_methods.cache_clear()
    try:
        with pytest.raises(CLBenchError, match=r"toy/variants.yaml: variant 'toy_b' needs"):
            index_methods()
        (package / "toy" / "variants.yaml").write_text(
            "toy_b:\n  base: nope\n  summary: s\n  options: {a: 1}\n")
        with pytest.raises(CLBenchError, match="names base 'nope'"):
            index_methods()
    finally:
        registry.index_methods.cache_clear()


def test_core_never_imports_a_method() -> None:
    import ast
    from pathlib import Path

    import cl_bench

    offenders = []
    for path in Path(cl_bench.__path__[0]).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "methods"]
    assert not offenders


def test_method_owned_analyses_reach_the_cli() -> None:
    from cl_bench.cli import build_parser

    args = build_parser().parse_args(["analyze", "layouts", "some/run"])
    assert args.handler.__module__ == "methods.hide_llava.layouts"
    assert build_parser().parse_args(["analyze", "cka", "--out", "x"]).handler.__name__ == (
        "analyze_cka"
    )


def test_declared_capabilities_are_read_from_source_as_the_class_has_them() -> None:
    entries = index_methods()
    for name, entry in entries.items():
        assert entry.capabilities == get_method(name).cls.capabilities, name
    assert entries["hide_llava"].capabilities.routes
    assert entries["hide_llava_text"].capabilities == entries["hide_llava"].capabilities
    assert not any(e.capabilities.task_id for e in entries.values())  # none may at test time
    with pytest.raises(CLBenchError, match="unknown launcher"):
        from cl_bench.registry import Capabilities

        Capabilities(launchers=("single", "mpi"))
