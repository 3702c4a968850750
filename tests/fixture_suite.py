"""``ucit-fixture``: UCIT's tasks on the tests' fixture data, with everything a method may ask of
a suite (an inquiry file, a default feature encoder), so that any registered method runs on it
without options of its own."""

from __future__ import annotations

from pathlib import Path

from conftest import INQUIRY_FILE, write_tiny_clip

from cl_bench.registry import SUITES
from tasks.suite import Suite
from tasks.suites.ucit import UCIT_TASKS

NAME = "ucit-fixture"


def fixture_clip(cache: Path) -> Path:
    """The suite's default encoder: the tiny CLIP, built into the cache on first use."""
    folder = cache / "fixture-clip"
    if not (folder / "config.json").is_file():
        write_tiny_clip(folder)
    return folder


def fixture_suite() -> Suite:
    """The suite, registered on first use."""
    if NAME not in SUITES.names():
        SUITES.register(NAME)(Suite(
            name=NAME,
            description="UCIT's tasks on the test fixture data (tests/conftest.py)",
            tasks=UCIT_TASKS,
            data_source="written by tests/conftest.py",
            tasks_dir="UCIT",
            image_dir="UCIT/datasets",
            inquiry_file=INQUIRY_FILE,
            default_encoder=f"{__name__}:fixture_clip",
        ))
    return SUITES.get(NAME)
