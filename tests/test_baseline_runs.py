"""The baselines end to end: a --quick run on the tiny fixtures, and --resume after a kill
continuing with exactly the state the method carried (its LoRAs, Fisher, buffer): the same
answers, records and final checkpoint as the uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from run_kit import LEARNING, assert_same_run, kill_after_predictions

from cl_bench.cli import main

BASELINES = {
    "seq_lora": [],
    "lwf": [],
    "ewc": ["--set", "method.fisher_batches=4"],
    "olora": ["--set", "method.orth_lambda=1.0"],
    "replay": ["--set", "method.buffer_size=4"],
}


def quick_argv(method: str, ucit_root: Path, model: Path, out: Path) -> list[str]:
    return ["run", "--method", method, "--suite", "ucit", "--data-root", str(ucit_root),
            "--model", str(model), "--quick", "--order", "RC", "--out", str(out),
            "--general", "none", "--set", "eval.max_new_tokens=4", *LEARNING,
            *BASELINES[method]]


def training_records(run: Path) -> list[dict]:
    lines = (run / "records.jsonl").read_text().splitlines()
    return [json.loads(line)["train"] for line in lines[1:]]


@pytest.mark.parametrize("method", list(BASELINES))
def test_quick_run_and_resume_carry_the_method_state(
    method: str, ucit_root: Path, taught_llava: Path, tmp_path: Path, monkeypatch
) -> None:
    full = tmp_path / "full"
    assert main(quick_argv(method, ucit_root, taught_llava, full)) == 0
    trained = training_records(full)
    assert len(trained) == 2
    term = {"lwf": "lwf", "ewc": "ewc", "olora": "orth"}.get(method)
    if term is not None:  # the method's own loss term took part in stage 2
        assert trained[1][term] > 0
    matrix = [line.split(",")[2:] for line in (full / "matrix.csv").read_text().splitlines()[1:]]
    assert min(map(float, matrix[0])) > 10 and matrix[0] != matrix[2]  # real, moving scores
    crashed = tmp_path / "crashed"
    kill_after_predictions(monkeypatch, 5)  # in stage 2's evaluation, after its training
    with pytest.raises(KeyboardInterrupt):
        main(quick_argv(method, ucit_root, taught_llava, crashed))
    monkeypatch.undo()
    assert main(["run", "--out", str(crashed), "--resume"]) == 0
    assert_same_run(crashed, full)
