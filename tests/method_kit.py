"""Driving a method through its hooks on the tiny fixtures, as the runner does, one step at a time:
a method built from its registered name, a stage, training, a batch, LoRA states."""

from __future__ import annotations

from pathlib import Path

import torch

from cl_bench.config import RunConfig
from cl_bench.method import Method, MethodContext, Stage
from cl_bench.models.batching import training_batches
from cl_bench.models.llava import load_llava
from cl_bench.registry import get_method, get_suite
from cl_bench.running.training import train_model

RANK, LORA_ALPHA = 2, 4.0  # LoRA scaling alpha / rank = 2


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


def stage(index: int, letters: str) -> Stage:
    return Stage(index, tuple(get_suite("ucit").resolve_order(letters)))


def train(method: Method, model: torch.nn.Module, at: Stage, tmp_path: Path) -> dict:
    """The runner's training of one stage: the method's samples and extra losses."""
    ctx = method.context
    return train_model(model, ctx.bundle, method.training_samples(at), ctx.config.train,
                       tmp_path / "trainer", ctx.config.seed + at.index, method.extra_losses)


def batch_of(method: Method, at: Stage, n: int = 4) -> dict:
    """A training batch (ids, labels, images) of the stage's first ``n`` samples."""
    ctx = method.context
    samples = method.training_samples(at)[:n]
    return next(training_batches(samples, ctx.bundle, n, 512, torch.device("cpu")))


def lora_state(model: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if "lora_" in n and f".{adapter}." in n}
