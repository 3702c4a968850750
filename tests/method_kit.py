"""Driving a method on the tiny fixtures as the runner does, one step at a time or end to end: its
context or the registered method itself, a stage, stand-in or real training through its hooks, a
batch, LoRA states, answers through its generation hook, and a quick run killed during stage 2
and resumed (which must give the uninterrupted run's matrix, stage-2 losses and files; the quick
runs' learning rate is high enough for a few steps to change the answers, so a lost method state
shows)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

import cl_bench.running.runner
from cl_bench.cli import main
from cl_bench.config import ModelConfig, RunConfig
from cl_bench.evaluation.generation import generate_answers
from cl_bench.method import Method, MethodContext, Stage
from cl_bench.models.batching import training_batches
from cl_bench.models.llava import load_llava
from cl_bench.registry import get_method, get_suite
from cl_bench.running.training import train_model
from tasks.loaders import load_samples

RANK, LORA_ALPHA = 2, 4.0  # LoRA scaling alpha / rank = 2


# -- a method and its context --------------------------------------------------------------------
def make_method(name: str, model_dir: Path, data_root: Path, run_dir: Path,
                suite: str = "ucit", **options) -> Method:
    """The registered method (or variant) ``name`` with ``options`` over its defaults, on a fresh
    copy of the model in ``model_dir`` loaded as a run loads it: rank-2 LoRA without dropout,
    4 steps of batch 4."""
    cfg = RunConfig(method=name, suite=suite, seed=0)
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout = RANK, LORA_ALPHA, 0.0
    cfg.train.batch_size, cfg.train.max_steps, cfg.train.learning_rate = 4, 4, 0.05
    cfg.train.warmup_ratio = 0
    spec = get_method(name)
    bundle = load_llava(model_dir, cfg.model)  # as the runner loads it (prompt format...)
    context = MethodContext(cfg, get_suite(suite), data_root, bundle, run_dir)
    return spec.cls(spec.options(options), context)


def make_context(method: str, tiny_llava: Path, ucit_root: Path, run_dir: Path,
                 real_training: bool = False) -> MethodContext:
    """A method's context on the tiny LLaVA and the UCIT-layout fixture: a rank-2 LoRA for
    stand-in training (``trained_like``), or with ``real_training`` (``train_stage``) the run's
    default LoRA and 3 Trainer steps of batch 4 at lr 1e-2."""
    cfg = RunConfig(method=method, suite="ucit", seed=0)
    if real_training:
        cfg.train.max_steps, cfg.train.batch_size, cfg.train.learning_rate = 3, 4, 1e-2
    else:
        cfg.lora.rank, cfg.lora.alpha = RANK, LORA_ALPHA
    return MethodContext(cfg, get_suite("ucit"), ucit_root, load_llava(tiny_llava), run_dir)


def model_settings(dtype: str, device: str = "cpu") -> ModelConfig:
    """The tiny LLaVA's model settings with its weights in ``dtype`` (bf16, fp16, fp32)."""
    return ModelConfig(device=device, dtype=dtype, attn_implementation="sdpa",
                       conversation="llava_hf", image_aspect_ratio="crop")


def load_tiny(tiny_llava: Path, dtype: str, device: str = "cpu"):
    """The tiny LLaVA's bundle with its weights in ``dtype`` on ``device``."""
    return load_llava(tiny_llava, model_settings(dtype, device))


def stage(index: int, tasks: str) -> Stage:
    """Stage ``index`` training on UCIT's ``tasks``: letters ("RA") or a task name."""
    return Stage(index, tuple(get_suite("ucit").resolve_order(tasks)))


def planned(method: Method, tasks: tuple[str, ...] = ("ImageNet-R", "ArxivQA")) -> Method:
    """``method`` with its stages planned over the UCIT tasks named (a run calls ``plan``
    first)."""
    method.plan([method.context.suite.task(task) for task in tasks])
    return method


# -- training -----------------------------------------------------------------------------------
def trained_like(model: torch.nn.Module, seed: int) -> None:
    """Stand-in for training: random non-zero LoRA B factors and a nudged projector."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                scale = 0.5 if "lora_B" in name else 0.01
                p.add_((scale * torch.randn(p.shape, generator=gen)).to(p.device))


def train(method: Method, model: torch.nn.Module, at: Stage, out: Path) -> dict:
    """The runner's training of one stage: the method's samples, extra losses and batch and
    optimizer-step hooks (Trainer files under ``out``)."""
    ctx = method.context
    return train_model(model, ctx.bundle, method.training_samples(at), ctx.config.train,
                       out / "trainer", ctx.config.seed + at.index, method.extra_losses,
                       functools.partial(method.before_train_batch, model),
                       before_step=functools.partial(method.before_optimizer_step, model))


def train_stage(method: Method, model, index: int, task: str):
    """``before_stage``, real Trainer steps through the method's hooks, ``after_stage``: the
    model after the stage and the training's record."""
    at = stage(index, task)
    model = method.before_stage(model, at)
    info = train(method, model, at, method.context.run_dir)
    return method.after_stage(model, at), info


def batch_of(method: Method, at: Stage, n: int = 4) -> dict:
    """A training batch (ids, labels, images) of the stage's first ``n`` samples."""
    ctx = method.context
    samples = method.training_samples(at)[:n]
    return next(training_batches(samples, ctx.bundle, n, 512, torch.device("cpu")))


def lora_state(model: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if "lora_" in n and f".{adapter}." in n}


def answers_in_batches(method: Method, evaluated, task: str, batch_size: int) -> dict[str, str]:
    """``evaluated``'s answers to a task's test samples through the method's hook, in batches
    of ``batch_size``."""
    ctx = method.context
    folder = ctx.data_root / "UCIT"
    samples = load_samples(folder / task / "test.json", folder / "datasets")
    hook = functools.partial(method.before_generate, evaluated, label=task)
    return generate_answers(evaluated, ctx.bundle, samples, batch_size, 5, task, hook)


# -- end to end ---------------------------------------------------------------------------------
def quick_argv(method: str, ucit_root: Path, tiny_llava: Path, out: Path, *sets: str) -> list[str]:
    """A quick two-stage run (R then A) of 3 steps at lr 0.01 per stage; ``sets``: more
    ``--set`` values."""
    argv = ["run", "--method", method, "--suite", "ucit", "--data-root", str(ucit_root),
            "--model", str(tiny_llava), "--quick", "--order", "RA", "--out", str(out),
            "--set", "eval.max_new_tokens=4", "--set", "train.max_steps=3",
            "--set", "train.learning_rate=0.01"]
    return argv + [x for s in sets for x in ("--set", s)]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]


def run_and_resume(
    method: str, ucit_root: Path, tiny_llava: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, *sets: str,
) -> tuple[Path, Path]:
    """A quick run, and the same run killed at stage 2 and resumed: the resumed run gives the
    same matrix, stage-2 predictions and routing counts and, up to float rounding, stage-2
    training losses (checked here).
    Returns the uninterrupted and the resumed run's folders."""
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    assert main(quick_argv(method, ucit_root, tiny_llava, whole, *sets)) == 0
    real_stage = cl_bench.running.runner.run_stage

    def crash_at_stage_2(method_, model, stage, *args, **kwargs):
        if stage.index == 2:
            raise KeyboardInterrupt("killed")
        return real_stage(method_, model, stage, *args, **kwargs)

    monkeypatch.setattr(cl_bench.running.runner, "run_stage", crash_at_stage_2)
    with pytest.raises(KeyboardInterrupt):
        main(quick_argv(method, ucit_root, tiny_llava, crashed, *sets))
    monkeypatch.setattr(cl_bench.running.runner, "run_stage", real_stage)
    assert main(["run", "--out", str(crashed), "--resume"]) == 0
    resumed, uninterrupted = records(crashed), records(whole)
    assert [r["stage"] for r in resumed] == [0, 1, 2]
    # equal up to float rounding: a reloaded checkpoint's merged weights may round differently
    assert resumed[2]["train"] == pytest.approx(uninterrupted[2]["train"], rel=1e-5)
    compared = ["matrix.csv"] + sorted(str(f.relative_to(whole)) for f in whole.rglob("*")
                                       if f.parent.name in ("stage_2", "routing") and f.is_file()
                                       and "checkpoints" not in f.parts)
    for name in compared:
        assert (crashed / name).read_bytes() == (whole / name).read_bytes(), name
    return whole, crashed
