"""Post-hoc alpha sweep (LLaVA-c Figure 4): re-consolidate a stage for many alphas, no retraining.

The model before stage T is rebuilt from the starting model and the stored raw updates of
stages 1..T-1 (consolidated as the run did); then, for each alpha, stage T's stored update is
consolidated with that alpha and every task (and general benchmark) is evaluated.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cl_bench import degradation
from cl_bench.consolidation import apply_sac, check_alpha, lora_spectrum, modelmix_delta, sac_delta
from cl_bench.deltas import LoraFactors, StageDelta, apply_delta
from cl_bench.errors import CLBenchError
from cl_bench.evaluation import evaluate_task
from cl_bench.general import evaluate_general
from cl_bench.method import MethodContext, parse_options
from cl_bench.models import load_llava
from cl_bench.registry import get_method, get_suite
from cl_bench.runner import RunFolder, load_test_sets, log, resolve_data_root, resolve_model
from methods.llava_c import consolidator, stored_delta

SWEEP_CONSOLIDATIONS = ("sac", "modelmix")


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
    return [check_alpha(a) for a in values]


@dataclass
class SweepConsolidator:
    """Consolidates one stored update for any alpha, decomposing each LoRA update only once."""

    kind: str
    boundary: str
    _spectra: dict[int, object]

    def __call__(self, update: LoraFactors | torch.Tensor, alpha: float) -> torch.Tensor:
        if self.kind == "modelmix":
            full = update.product() if isinstance(update, LoraFactors) else update
            return modelmix_delta(full, alpha)  # LLaVA-c eq. 4
        if isinstance(update, LoraFactors):
            key = id(update)
            if key not in self._spectra:
                self._spectra[key] = lora_spectrum(update.B, update.A, update.scaling)
            P, Q = apply_sac(self._spectra[key], alpha, self.boundary)
            return P @ Q  # LLaVA-c eq. 5-7, factored path
        return sac_delta(update, alpha, self.boundary)  # LLaVA-c eq. 5-7, full path


def touched(model: torch.nn.Module, delta: StageDelta) -> dict[str, torch.Tensor]:
    """The tensors a stage's update changes, by name (weights of LoRA'd modules, full params)."""
    params = dict(model.named_parameters())
    names = [f"{m}.weight" for m in delta.lora] + list(delta.full)
    return {n: params[n] for n in names}


def sweep_alpha(run_dir: Path, stage: int, alphas: list[float], consolidation: str) -> Path:
    """Evaluate stage ``stage`` of a llava_c-family run re-consolidated with each alpha."""
    if consolidation not in SWEEP_CONSOLIDATIONS:
        raise CLBenchError(f"--consolidation {consolidation!r}: expected {SWEEP_CONSOLIDATIONS}")
    folder = RunFolder(Path(run_dir))
    if not (folder.path / "config.yaml").exists():
        raise CLBenchError(f"{run_dir} holds no run (no config.yaml)")
    cfg = folder.read_config()
    method = get_method(cfg.method)
    if "consolidation" not in {f.name for f in dataclasses.fields(method.Options)}:
        raise CLBenchError(
            f"{run_dir} is a {cfg.method} run, which stores no deltas; sweep a llava_c-family run"
        )
    options = parse_options(method, cfg.method_options)
    if stage < 1:
        raise CLBenchError(f"--stage {stage}: stages start at 1")
    deltas = [stored_delta(folder.path, s) for s in range(1, stage + 1)]
    suite = get_suite(cfg.suite)
    tasks = suite.resolve_order(cfg.order)
    data_root = resolve_data_root(suite, cfg)
    test_sets = load_test_sets(suite, tasks, data_root, cfg)
    bundle = load_llava(resolve_model(suite, cfg))
    model = bundle.model
    with torch.no_grad():
        run_consolidate = consolidator(options.consolidation, options.alpha, options.boundary)
        for delta in deltas[:-1]:
            apply_delta(model, delta, run_consolidate)
        saved = {n: t.detach().clone() for n, t in touched(model, deltas[-1]).items()}
    ctx = MethodContext(cfg, suite, data_root, bundle, folder.path)
    benchmarks = degradation.prepare(ctx, tasks, []).benchmarks
    consolidate = SweepConsolidator(consolidation, options.boundary, {})
    out = folder.path / "sweeps" / f"stage_{stage}_{consolidation}"
    rows = []
    for alpha in alphas:
        t0 = time.time()
        with torch.no_grad():
            for name, tensor in touched(model, deltas[-1]).items():
                tensor.copy_(saved[name])
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
    title = f"{cfg.suite}: {cfg.method}, stage {stage} re-consolidated by {consolidation}"
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
