"""CoIN (Chen et al. 2024; HiDe-LLaVA Tables 2 and 6): eight tasks in the CoIN repository's order.

Layout as in the CoIN repository: ``Instructions_Original/<Task>/{train,test}.json`` and the
images of every source under ``cl_dataset/`` (the paths in the JSON files are relative to it).
"""

from __future__ import annotations

from cl_bench.registry import SUITES
from tasks.suite import Suite, TaskSpec
from tasks.suites.recipe import HIDE_LLAVA_BENCHMARK
from tasks.suites.ucit import OPTION, WORD

REC = "Please provide the bounding box coordinate of the region this sentence describes:"
TRAIN_FILES = ("train.json",)
TEST_FILES = ("test.json", "test_3000.json")
# TextVQA, VizWiz and VQAv2 answers are public for their validation splits only: a val.json
# (with answers) is preferred to a test.json that may lack them.
VAL_FIRST = ("val.json", *TEST_FILES)


def coin_task(
    name: str, letter: str, folders: tuple[str, ...], instruction: str, answer_type: str,
    expected_train: int = 20000, test_files: tuple[str, ...] = TEST_FILES,
    reference_files: tuple[str, ...] = (),
) -> TaskSpec:
    """A CoIN task (3,000 test records)."""
    return TaskSpec(
        name, letter, folders, instruction, answer_type, TRAIN_FILES, test_files,
        expected_train=expected_train, expected_test=3000, reference_files=reference_files,
    )


COIN_TASKS = (
    coin_task("ScienceQA", "S", ("ScienceQA",), OPTION, "option"),
    coin_task("TextVQA", "T", ("TextVQA",), WORD, "vqa", 34602, VAL_FIRST,
              ("TextVQA_0.5.1_val.json", "TextVQA/TextVQA_0.5.1_val.json")),
    coin_task("ImageNet", "I", ("ImageNet",), WORD, "word"),
    coin_task("GQA", "G", ("GQA",), WORD, "word"),
    coin_task("VizWiz", "V", ("VizWiz",), WORD, "vqa", 20523, VAL_FIRST,
              ("VizWiz/Annotations/val.json",)),
    coin_task("Grounding", "R", ("Grounding", "REC-COCO", "RefCOCO"), REC, "bbox",
              test_files=(*TEST_FILES, "test_5k.json"), reference_files=("test_5k.json",)),
    coin_task("VQAv2", "Q", ("VQAv2", "VQA_v2", "VQAV2"), WORD, "vqa", test_files=VAL_FIRST,
              reference_files=("v2_mscoco_val2014_annotations.json",
                               "VQAv2/v2_mscoco_val2014_annotations.json")),
    coin_task("OCR-VQA", "O", ("OCRVQA", "OCR-VQA"), WORD, "word",
              test_files=(*TEST_FILES, "test_1.json")),
)

COIN = SUITES.register("coin")(
    Suite(
        name="coin",
        description="CoIN's eight tasks (ScienceQA, TextVQA, ImageNet, GQA, VizWiz, Grounding, "
        "VQAv2, OCR-VQA)",
        tasks=COIN_TASKS,
        data_source="the CoIN instructions (Hugging Face dataset 'Zacks-Chen/CoIN', folder "
        "Instructions_Original) and the images of ScienceQA, TextVQA, ImageNet, GQA, VizWiz, "
        "COCO 2014 (RefCOCO/+/g, VQAv2) and OCR-VQA, downloaded by you beforehand; see "
        "docs/suites.md",
        tasks_dir="Instructions_Original",
        image_dir="cl_dataset",
        defaults=HIDE_LLAVA_BENCHMARK,
    )
)
