"""Helpers for method tests: a method's context on the tiny fixtures, one real training stage
through its hooks, and an end-to-end run crashed after stage 1 and resumed."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

import cl_bench.running.runner
from cl_bench.cli import main
from cl_bench.config import RunConfig
from cl_bench.evaluation.generation import generate_answers
from cl_bench.method import Method, MethodContext, Stage
from cl_bench.models.llava import load_llava
from cl_bench.registry import get_suite
from cl_bench.running.training import train_model
from tasks.loaders import load_samples


def method_context(tiny_llava: Path, ucit_root: Path, run_dir: Path, method: str) -> MethodContext:
    cfg = RunConfig(method=method, suite="ucit", seed=0)
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.learning_rate = 3, 4, 1e-2
    return MethodContext(cfg, get_suite("ucit"), ucit_root, load_llava(tiny_llava), run_dir)


def stage(index: int, task: str) -> Stage:
    return Stage(index, (get_suite("ucit").task(task),))


def train_stage(method: Method, model, index: int, task: str):
    """``before_stage``, a few real Trainer steps through the method's hooks, ``after_stage``."""
    ctx = method.context
    model = method.before_stage(model, stage(index, task))
    info = train_model(model, ctx.bundle, method.training_samples(stage(index, task)),
                       ctx.config.train, ctx.run_dir / "trainer", index, method.extra_losses,
                       functools.partial(method.before_train_batch, model))
    return method.after_stage(model, stage(index, task)), info


def answers_in_batches(method: Method, evaluated, task: str, batch_size: int) -> dict[str, str]:
    """``evaluated``'s answers to a task's test samples through the method's hook, in batches
    of ``batch_size``."""
    ctx = method.context
    folder = ctx.data_root / "UCIT"
    samples = load_samples(folder / task / "test.json", folder / "datasets")
    hook = functools.partial(method.before_generate, evaluated, label=task)
    return generate_answers(evaluated, ctx.bundle, samples, batch_size, 5, task, hook)


def quick_run(ucit_root: Path, tiny_llava: Path, out: Path, method: str, *sets: str) -> list[str]:
    argv = ["run", "--method", method, "--suite", "ucit", "--data-root", str(ucit_root),
            "--model", str(tiny_llava), "--quick", "--order", "RA", "--out", str(out),
            "--set", "eval.max_new_tokens=4", "--set", "train.max_steps=3"]
    return argv + [x for s in sets for x in ("--set", s)]


def run_resumed_and_whole(ucit_root: Path, tiny_llava: Path, tmp_path: Path, method: str,
                          monkeypatch, *sets: str) -> tuple[Path, Path]:
    """A quick run killed at stage 2 and resumed, and the same run uninterrupted: the resumed
    run must give the same matrix, stage-2 training losses and predictions (checked here)."""
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    assert main(quick_run(ucit_root, tiny_llava, whole, method, *sets)) == 0
    real_stage = cl_bench.running.runner.run_stage

    def crash_at_stage_2(method, model, stage, *args, **kwargs):
        if stage.index == 2:
            raise KeyboardInterrupt("killed")
        return real_stage(method, model, stage, *args, **kwargs)

    monkeypatch.setattr(cl_bench.running.runner, "run_stage", crash_at_stage_2)
    with pytest.raises(KeyboardInterrupt):
        main(quick_run(ucit_root, tiny_llava, crashed, method, *sets))
    monkeypatch.setattr(cl_bench.running.runner, "run_stage", real_stage)
    assert main(["run", "--out", str(crashed), "--resume"]) == 0
    assert (crashed / "matrix.csv").read_text() == (whole / "matrix.csv").read_text()
    resumed, uninterrupted = records(crashed), records(whole)
    assert [r["stage"] for r in resumed] == [0, 1, 2]
    assert resumed[2]["train"] == uninterrupted[2]["train"]
    for path in (whole / "predictions" / "stage_2").iterdir():
        assert (crashed / path.relative_to(whole)).read_text() == path.read_text()
    return whole, crashed


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
