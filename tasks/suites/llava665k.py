"""LLaVA-c's continual pretraining (Tables 1 and 7): LLaVA-665k split into six tasks by image
source, learned from a model after vision-language alignment (stage 1).

The split files are made once by ``clbench data split665k`` (``tasks.llava665k``); each task's
``test.json`` is a retention probe drawn from its own training records, since the paper evaluates
this suite on general benchmarks.
"""

from __future__ import annotations

from cl_bench.registry import SUITES
from tasks.llava665k import EXPECTED_COUNTS, INQUIRY_FILE, PROBE_RULES, SOURCE_FILE, SPLITS_DIR
from tasks.suite import Suite, TaskSpec
from tasks.suites.recipe import LLAVA_C_BENCHMARK
from tasks.suites.ucit import WORD

# The general benchmarks LLaVA-c reports (Table 1): not run by default, since lmms-eval reads them
# from the Hugging Face cache (and some need a judge model); name those you have with --general.
PAPER_GENERAL_BENCHMARKS = (
    "pope", "mme", "mmbench_en_dev", "seedbench", "llava_in_the_wild", "mmvet", "mmmu_val",
)
# LLaVA-c, Table 7: the task-specific instruction of each split ("" where it has none), as the
# records of llava_v1_5_mix665k.json word it.
INSTRUCTIONS = {
    "tqa": "", "coco": "", "ocr": WORD,
    "textvqa": "Provide a one-sentence caption for the provided image.",
    "gqa": WORD, "vg": "Provide the bounding box coordinate of the region",
}
LETTERS = {"tqa": "Q", "coco": "C", "ocr": "O", "textvqa": "T", "gqa": "G", "vg": "V"}

LLAVA665K = SUITES.register("llava665k")(
    Suite(
        name="llava665k",
        description="LLaVA-c continual pretraining: llava_v1_5_mix665k split by image source "
        "(tqa, coco, ocr, textvqa, gqa, vg), from a stage-1 (aligned) LLaVA",
        tasks=tuple(
            TaskSpec(name, LETTERS[name], (name,), INSTRUCTIONS[name],
                     PROBE_RULES[name].answer_type, expected_train=count)
            for name, count in EXPECTED_COUNTS.items()
        ),
        data_source=f"LLaVA-1.5's instruction mix {SOURCE_FILE} with its image folders (coco/, "
        "gqa/, ocr_vqa/, textvqa/, vg/) in the data root, split once into "
        f"{SPLITS_DIR}/<task>/ by `clbench data split665k --data-root PATH`; see docs/suites.md",
        tasks_dir=SPLITS_DIR,
        image_dir="",
        inquiry_file=INQUIRY_FILE,
        defaults=LLAVA_C_BENCHMARK,
    )
)
