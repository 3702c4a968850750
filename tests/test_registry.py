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
        assert get_method(name).__name__


def test_order_by_letters_and_names() -> None:
    suite = get_suite("ucit")
    assert [t.letter for t in suite.resolve_order("AIRFCV")] == list("AIRFCV")
    assert [t.name for t in suite.resolve_order("IconQA,ArxivQA")] == ["IconQA", "ArxivQA"]
    with pytest.raises(CLBenchError, match="twice"):
        suite.resolve_order("IconQA,IconQA")
    with pytest.raises(CLBenchError, match="unknown task"):
        suite.resolve_order("IconQA,Nope")
