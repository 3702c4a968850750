"""Every registered method and variant runs end to end: a new method is covered the day it is
registered. Whatever a method needs from a suite (inquiries, an encoder) comes from the fixture
suite, never from options given here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixture_suite import NAME, fixture_suite

from cl_bench.cli import main
from cl_bench.registry import index_methods

ORDER = ["ImageNet-R", "ArxivQA"]


@pytest.mark.parametrize("method", sorted(index_methods()))
def test_a_quick_run_of_every_registered_method(
    method: str, ucit_root: Path, tiny_llava: Path, tmp_path: Path, monkeypatch
) -> None:
    fixture_suite()
    monkeypatch.setenv("CLBENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    argv = ["run", "--method", method, "--suite", NAME, "--data-root", str(ucit_root),
            "--model", str(tiny_llava), "--quick", "--order", "RA", "--out", str(out),
            "--general", "none", "--set", "train.max_steps=2", "--set", "train.batch_size=4",
            "--set", "eval.limit=4", "--set", "eval.max_new_tokens=3"]
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == list(range(len(records)))
    trained = [task for r in records for task in r["trained_on"]]
    assert trained == ([] if len(records) == 1 else ORDER)  # each task learned once, in order
    assert all(set(r["scores"]) == set(ORDER) for r in records)
    for r in records[1:]:
        assert r["train"]["train_loss"] > 0
    matrix = (out / "matrix.csv").read_text().splitlines()
    assert len(matrix) == 1 + len(records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["final"] == records[-1]["scores"]
    for task in ORDER:
        assert (out / "predictions" / f"stage_{len(records) - 1}" / f"{task}.jsonl").is_file()
    if len(records) > 1:
        assert (out / "checkpoints" / f"stage_{len(records) - 1}").is_dir()
