"""Post-hoc alpha sweep (LLaVA-c Figure 4): re-consolidate a stage for many alphas, no retraining.

For runs of methods that consolidate each stage's stored update with a mix ratio (the method's
``consolidation`` hook: LLaVA-c, ModelMix). The model before stage T is rebuilt from the starting
model and the stored raw updates of stages 1..T-1 (consolidated as the run did); then, for each
alpha, stage T's stored update is consolidated with that alpha (and any method options given
for the sweep) and every task (and general benchmark) is evaluated.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cl_bench.errors import CLBenchError
from cl_bench.evaluation import degradation
from cl_bench.evaluation.general import evaluate_general
from cl_bench.evaluation.generation import evaluate_task
from cl_bench.method import Method, MethodContext
from cl_bench.models.deltas import StageDelta, load_stage_delta
from cl_bench.models.llava import load_llava
from cl_bench.models.updates import Update, apply_delta, updatable
from cl_bench.registry import get_method, get_suite
from cl_bench.running.run_folder import RunFolder
from cl_bench.running.runner import load_test_sets, log, resolve_data_root, resolve_model


def parse_alphas(text: str) -> list[float]:
    """``start:stop:step`` (inclusive) or a comma-separated list; each in [0, 1]."""
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0:
                raise ValueError
            values = np.arange(start, stop + step / 2, step).round(6).tolist()
        else:
            values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CLBenchError(
            f"--alphas {text!r}: expected start:stop:step (e.g. 0:1:0.1) or a list (0,0.2,0.5)"
        ) from None
    if not values:
        raise CLBenchError(f"--alphas {text!r} gives no alpha")
    bad = [a for a in values if not 0.0 <= a <= 1.0]
    if bad:
        raise CLBenchError(f"--alphas {text!r}: alpha must be in [0, 1], got {bad[0]}")
    return values


@dataclass
class Mark:
    """What undoing the next application of a stage's update needs: per updated layer, its
    number of updates (and, if merged into float32 weights, the weight); full parameters."""

    layers: dict[str, tuple[int, torch.Tensor | None]]
    full: dict[str, torch.Tensor]


@torch.no_grad()
def mark(model: torch.nn.Module, delta: StageDelta) -> Mark:
    layers = {}
    for name in delta.lora:
        layer = updatable(model, name)
        layers[name] = (len(layer.ranks), layer.weight.detach().clone() if layer.merged else None)
    params = dict(model.named_parameters())
    return Mark(layers, {name: params[name].detach().clone() for name in delta.full})


@torch.no_grad()
def restore(model: torch.nn.Module, marked: Mark) -> None:
    for name, (stages, weight) in marked.layers.items():
        updatable(model, name).truncate(stages, weight)
    params = dict(model.named_parameters())
    for name, value in marked.full.items():
        params[name].copy_(value)


def sweep_alpha(
    run_dir: Path, stage: int, alphas: list[float], overrides: dict[str, Any] | None = None
) -> Path:
    """Evaluate stage ``stage`` of a run re-consolidated with each alpha; ``overrides`` are
    method options for the swept stage only (e.g. ``{"consolidation": "modelmix"}``)."""
    folder = RunFolder(Path(run_dir))
    if not (folder.path / "config.yaml").exists():
        raise CLBenchError(f"{run_dir} holds no run (no config.yaml)")
    cfg = folder.read_config()
    spec = get_method(cfg.method)
    if spec.cls.consolidation is Method.consolidation:
        raise CLBenchError(
            f"{run_dir} is a {cfg.method} run, which stores no deltas to re-consolidate; sweep a "
            "run of a method that consolidates its stage updates (llava_c, modelmix, ...)"
        )
    run_options = spec.options(cfg.method_options)
    swept_options = spec.options({**cfg.method_options, **(overrides or {})})
    if stage < 1:
        raise CLBenchError(f"--stage {stage}: stages start at 1")
    deltas = [load_stage_delta(folder.path, s) for s in range(1, stage + 1)]
    suite = get_suite(cfg.suite)
    tasks = suite.resolve_order(cfg.order)
    data_root = resolve_data_root(suite, cfg)
    test_sets = load_test_sets(suite, tasks, data_root, cfg)
    bundle = load_llava(resolve_model(suite, cfg), cfg.model)
    ctx = MethodContext(cfg, suite, data_root, bundle, folder.path)
    run_method, swept = spec.cls(run_options, ctx), spec.cls(swept_options, ctx)
    model = bundle.model
    for delta in deltas[:-1]:
        apply_delta(model, delta, lambda u: run_method.consolidation(u)(None))
    before_swept = mark(model, deltas[-1])
    at_alpha: dict[int, Callable[[float | None], Update]] = {}

    def consolidate(update, alpha: float) -> Update:
        if id(update) not in at_alpha:  # each update of the swept stage is decomposed once
            at_alpha[id(update)] = swept.consolidation(update)
        return at_alpha[id(update)](alpha)

    benchmarks = degradation.prepare(ctx, tasks, []).benchmarks
    label = "_".join(str(v) for _, v in sorted((overrides or {}).items()))
    out = folder.path / "sweeps" / (f"stage_{stage}_{label}" if label else f"stage_{stage}")
    rows = []
    for alpha in alphas:
        t0 = time.time()
        restore(model, before_swept)
        apply_delta(model, deltas[-1], lambda u, a=alpha: consolidate(u, a))
        seconds = time.time() - t0
        row = {"alpha": alpha, "consolidation_seconds": round(seconds, 3)}
        for task in tasks:
            result = evaluate_task(
                model, bundle, task.name, task.answer_type, test_sets[task.name],
                cfg.eval.batch_size, cfg.eval.max_new_tokens, cfg.eval.rule,
            )
            row[task.name] = result.score.score
        general = evaluate_general(model, bundle, benchmarks, data_root, cfg,
                                   out / f"general_alpha_{alpha:g}")
        row["general"] = general
        log(f"alpha {alpha:g}: " + ", ".join(f"{t.name} {row[t.name]:.1f}" for t in tasks))
        rows.append(row)
    given = ", ".join(f"{k}={v}" for k, v in sorted((overrides or {}).items()))
    title = f"{cfg.suite}: {cfg.method}, stage {stage} re-consolidated" + (
        f" with {given}" if given else "")
    return write_sweep(out, rows, [t.name for t in tasks], title)


def write_sweep(out: Path, rows: list[dict], tasks: list[str], title: str) -> Path:
    """``alpha.csv`` (one row per alpha), ``alpha.json`` and the alpha-curve plot."""
    from reports.alpha_curves import flatten_rows, plot_alpha_curves

    out.mkdir(parents=True, exist_ok=True)
    (out / "alpha.json").write_text(json.dumps(rows, indent=2))
    frame = flatten_rows(rows, tasks)
    frame.to_csv(out / "alpha.csv", index=False)
    plot_alpha_curves(frame, tasks, out / "alpha.png", title)
    return out / "alpha.csv"
