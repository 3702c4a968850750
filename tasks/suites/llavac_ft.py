"""LLaVA-c's continual fine-tuning (Table 7): five tasks unseen by LLaVA-1.5, learned from a
trained LLaVA-1.5 and evaluated on the tasks (2,000 test records each) and general benchmarks.

Layout: ``LLaVA-c/<Task>/{train,test}.json`` with images under ``LLaVA-c/datasets/``; the
unlabeled inquiries of LLaVA-c's UIR are llava665k's (``llava665k/inquiries.json``).
"""

from __future__ import annotations

from cl_bench.registry import SUITES
from tasks.llava665k import INQUIRY_FILE
from tasks.suite import Suite, TaskSpec
from tasks.suites.recipe import LLAVA_C_BENCHMARK
from tasks.suites.ucit import OPTION, WORD

FIGUREQA = "Please answer the question and provide the correct option letter at the end."
TRAIN_FILES = ("train.json",)
TEST_FILES = ("test.json", "test_2000.json")


def ft_task(
    name: str, letter: str, folders: tuple[str, ...], instruction: str, answer_type: str,
    expected_train: int,
) -> TaskSpec:
    return TaskSpec(name, letter, folders, instruction, answer_type, TRAIN_FILES, TEST_FILES,
                    expected_train=expected_train, expected_test=2000)


LLAVAC_FT = SUITES.register("llavac-ft")(
    Suite(
        name="llavac-ft",
        description="LLaVA-c continual fine-tuning: IconQA, Super-CLEVR, CLEVR-Math, FigureQA, "
        "ArxivQA, from a trained LLaVA-1.5",
        tasks=(
            ft_task("IconQA", "I", ("IconQA",), OPTION, "option", 29859),
            ft_task("Super-CLEVR", "S", ("Super-CLEVR", "SuperCLEVR", "Super"), WORD, "word",
                    20000),
            ft_task("CLEVR-Math", "C", ("CLEVR-Math", "Clevr-Math", "CLEVR"), WORD, "word", 40000),
            ft_task("FigureQA", "F", ("FigureQA", "Figure"), FIGUREQA, "option", 13597),
            ft_task("ArxivQA", "A", ("ArxivQA", "Arxiv"), OPTION, "option", 40000),
        ),
        data_source="subsets of IconQA, Super-CLEVR, CLEVR-Math, FigureQA and ArxivQA in LLaVA "
        "conversation format (LLaVA-c, Table 7), prepared by you beforehand; see docs/suites.md",
        tasks_dir="LLaVA-c",
        image_dir="LLaVA-c/datasets",
        inquiry_file=INQUIRY_FILE,
        defaults=LLAVA_C_BENCHMARK,
    )
)
