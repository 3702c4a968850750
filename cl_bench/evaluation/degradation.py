"""Base model degradation, measured at every stage: general benchmarks (lmms-eval) and probes.

The runner calls ``prepare`` once per run and ``Degradation.measure`` after the tasks are
evaluated at stage 0 (the starting model) and after every stage (the model as the method
assembles it, with the method's ``before_generate`` hook). Results go into the stage's record
under ``general`` and ``probes``; ``summary_general`` and ``summary_probes`` gather them for
``summary.json``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch

from cl_bench.evaluation.general import (
    evaluate_general,
    lmms_eval_error,
    require_lmms_eval,
    resolve_benchmarks,
)
from cl_bench.evaluation.generation import method_hook
from cl_bench.evaluation.probes import (
    PROBE_TOKENS,
    Inquiry,
    Matcher,
    format_matcher,
    load_inquiries,
    run_probes,
    subset,
)
from cl_bench.evaluation.sharding import on_main
from cl_bench.method import Method, MethodContext, Stage
from tasks.suite import TaskSpec

INSTALL_NOTE = "pip install 'cl-bench[lmms]'"


def log(message: str) -> None:
    print(f"[clbench] {message}", file=sys.stderr, flush=True)


@dataclass
class Degradation:
    """What to measure after each stage, resolved once per run."""

    ctx: MethodContext
    stages: list[Stage]
    benchmarks: list[str] = field(default_factory=list)
    inquiries: list[Inquiry] | None = None
    formats: dict[str, Matcher] = field(default_factory=dict)

    def learned(self, stage: int) -> list[str]:
        return [t.name for s in self.stages if s.index <= stage for t in s.tasks]

    def measure(self, model: torch.nn.Module, stage: int, method: Method | None = None) -> dict:
        """General scores and probe numbers of ``model`` after ``stage`` (0: the start)."""
        cfg, run_dir, out = self.ctx.config, self.ctx.run_dir, {}
        if self.benchmarks:
            t0 = time.time()
            out["general"] = evaluate_general(
                model, self.ctx.bundle, self.benchmarks, self.ctx.data_root, cfg,
                run_dir / "general" / f"stage_{stage}", method_hook(method, model, "general"),
            )
            log(f"stage {stage}: general {headline(out['general'])} ({time.time() - t0:.0f} s)")
        start_file = run_dir / "probes" / "start.pt"
        if self.inquiries and (stage == 0 or on_main(start_file.exists)):
            out["probes"] = run_probes(
                model, self.ctx.bundle, self.inquiries, stage, run_dir / "probes",
                cfg.eval.batch_size, max(cfg.eval.max_new_tokens, PROBE_TOKENS), self.formats,
                self.learned(stage), method_hook(method, model, "probes"),
            )
            p = out["probes"]
            log(f"stage {stage}: probes words mean {p['mean_words']:.1f} median "
                f"{p['median_words']:g}, short "
                f"{100 * p['short_share']:.0f}%, language shift {p['language_shift']:.3f}")
        elif self.inquiries:
            log(f"stage {stage}: probes skipped (the starting model was not probed at stage 0)")
        return out


def prepare(ctx: MethodContext, tasks: list[TaskSpec], stages: list[Stage]) -> Degradation:
    """Resolve the benchmarks (the suite's own are skipped without lmms-eval; named ones need
    it) and load the probes and each task's answer format."""
    cfg, suite = ctx.config, ctx.suite
    deg = Degradation(ctx, stages, resolve_benchmarks(cfg.general, suite.general_benchmarks))
    if deg.benchmarks and cfg.general is None and lmms_eval_error() is not None:
        log(f"general benchmarks skipped: lmms-eval is not installed ({INSTALL_NOTE})")
        deg.benchmarks = []
    elif deg.benchmarks:
        require_lmms_eval(deg.benchmarks)
    if cfg.probes and suite.probe_file:
        probes = load_inquiries(ctx.suite_file(suite.probe_file, "probe"))
        deg.inquiries = subset(probes, cfg.eval.limit)
        deg.formats = {
            t.name: format_matcher(t.answer_type, [s.answer for s in ctx.train_samples(t)])
            for t in tasks
        }
    return deg


def headline(scores: dict[str, dict[str, float | None]]) -> str:
    """``bench metric=value`` for each benchmark's first metric."""
    parts = []
    for bench, metrics in scores.items():
        name, value = next(iter(metrics.items()), ("-", None))
        parts.append(f"{bench} {name}=" + ("-" if value is None else f"{value:.2f}"))
    return ", ".join(parts)


def summary_general(records: list[dict]) -> dict[str, dict[str, list[float | None]]]:
    """benchmark -> metric -> one value per stage (None where a stage lacks it)."""
    names: dict[str, dict[str, None]] = {}
    for r in records:
        for bench, metrics in r.get("general", {}).items():
            names.setdefault(bench, {}).update(dict.fromkeys(metrics))
    return {
        bench: {m: [r.get("general", {}).get(bench, {}).get(m) for r in records] for m in metrics}
        for bench, metrics in names.items()
    }


def summary_probes(records: list[dict]) -> list[dict]:
    """The probe numbers of each stage that has them (without the example answers)."""
    return [
        {"stage": r["stage"], **{k: v for k, v in r["probes"].items() if k != "examples"}}
        for r in records
        if "probes" in r
    ]
