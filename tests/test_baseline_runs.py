"""The baselines end to end: a --quick run on the tiny fixtures, and --resume after a crash
continuing with exactly the state the method carried (its LoRAs, Fisher, buffer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import cl_bench.running.runner
from cl_bench.cli import main

BASELINES = {
    "seq_lora": [],
    "lwf": [],
    "ewc": ["--set", "method.fisher_batches=4"],
    "olora": ["--set", "method.orth_lambda=1.0"],
    "replay": ["--set", "method.buffer_size=4"],
}


def quick_argv(method: str, ucit_root: Path, tiny_llava: Path, out: Path) -> list[str]:
    return ["run", "--method", method, "--suite", "ucit", "--data-root", str(ucit_root),
            "--model", str(tiny_llava), "--quick", "--order", "RA", "--out", str(out),
            "--general", "none", "--set", "eval.max_new_tokens=4",
            "--set", "train.learning_rate=0.01", *BASELINES[method]]


def training_records(run: Path) -> list[dict]:
    lines = (run / "records.jsonl").read_text().splitlines()
    return [json.loads(line)["train"] for line in lines[1:]]


@pytest.mark.parametrize("method", list(BASELINES))
def test_quick_run_and_resume_carry_the_method_state(
    method: str, ucit_root: Path, tiny_llava: Path, tmp_path: Path, monkeypatch
) -> None:
    full = tmp_path / "full"
    assert main(quick_argv(method, ucit_root, tiny_llava, full)) == 0
    trained = training_records(full)
    assert len(trained) == 2
    term = {"lwf": "lwf", "ewc": "ewc", "olora": "orth"}.get(method)
    if term is not None:  # the method's own loss term took part in stage 2
        assert trained[1][term] > 0
    real_stage = cl_bench.running.runner.run_stage

    def crash_at_stage_2(method, model, stage, *args, **kwargs):
        if stage.index == 2:
            raise KeyboardInterrupt("killed")
        return real_stage(method, model, stage, *args, **kwargs)

    crashed = tmp_path / "crashed"
    monkeypatch.setattr(cl_bench.running.runner, "run_stage", crash_at_stage_2)
    with pytest.raises(KeyboardInterrupt):
        main(quick_argv(method, ucit_root, tiny_llava, crashed))
    monkeypatch.setattr(cl_bench.running.runner, "run_stage", real_stage)
    assert main(["run", "--out", str(crashed), "--resume"]) == 0
    resumed = training_records(crashed)
    for key, value in trained[1].items():
        assert resumed[1][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert (crashed / "matrix.csv").read_text() == (full / "matrix.csv").read_text()
