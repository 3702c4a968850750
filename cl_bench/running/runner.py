"""The one sequential runner: evaluate the start, then train, consolidate and evaluate per stage.

Everything it writes goes through the run folder (``cl_bench.running.run_folder``), the contract
with reports and resume.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from cl_bench.config import RunConfig, to_dict
from cl_bench.errors import CLBenchError
from cl_bench.evaluation import degradation
from cl_bench.evaluation.generation import TaskResult, evaluate_task
from cl_bench.method import Method, MethodContext, Stage
from cl_bench.metrics import summarize
from cl_bench.models.llava import load_llava
from cl_bench.models.placement import compute_dtype, device_of
from cl_bench.registry import call_target, get_method, get_suite
from cl_bench.running.run_folder import TRAINING_FILE, RunFolder, create_folder, reopen_folder
from cl_bench.running.training import MethodState, train_model
from tasks.data_check import require_valid_data
from tasks.loaders import load_test_samples
from tasks.suite import Suite, TaskSpec


def log(message: str) -> None:
    print(f"[clbench] {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """Where generated data and built models are cached (``CLBENCH_CACHE``)."""
    return Path(os.environ.get("CLBENCH_CACHE", Path.home() / ".cache" / "cl_bench"))


def resolve_data_root(suite: Suite, cfg: RunConfig) -> Path:
    """The data root: config, then ``CLBENCH_DATA_ROOT``, then the suite's own generator."""
    given = cfg.data_root or os.environ.get("CLBENCH_DATA_ROOT")
    if given:
        root = Path(given).expanduser()
        if not root.is_dir():
            raise CLBenchError(f"data root {root} is not a folder (layout: {suite.layout_hint()})")
        return root
    if suite.generator:
        return Path(call_target(suite.generator, cache_dir()))
    raise CLBenchError(
        f"suite {suite.name} reads your data: give --data-root PATH (or CLBENCH_DATA_ROOT). "
        f"Layout: {suite.layout_hint()}. Data: {suite.data_source}"
    )


def resolve_model(suite: Suite, cfg: RunConfig) -> Path:
    if cfg.model.path:
        return Path(cfg.model.path).expanduser()
    if suite.default_model:
        return Path(call_target(suite.default_model, cache_dir()))
    raise CLBenchError(f"suite {suite.name} needs --model PATH (a local LLaVA folder)")


def set_seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_test_sets(suite: Suite, tasks: list[TaskSpec], root: Path, cfg: RunConfig) -> dict:
    """Every task's test samples (limited, a fixed subset per seed), checked up front."""
    sets = {}
    for task in tasks:
        files = suite.task_files(task, root)
        samples = load_test_samples(files)
        if cfg.eval.limit is not None and len(samples) > cfg.eval.limit:
            samples = random.Random(cfg.seed).sample(samples, cfg.eval.limit)
        sets[task.name] = samples
    return sets


def evaluate_all(
    model, ctx: MethodContext, tasks: list[TaskSpec], test_sets: dict, stage: int,
    folder: RunFolder, method: Method | None = None,
) -> dict[str, TaskResult]:
    """Evaluate every task; ``method.before_generate`` sees each batch (after stage 0)."""
    cfg = ctx.config
    results = {}
    for task in tasks:
        hook = None
        if method is not None:
            hook = functools.partial(method.before_generate, model, label=task.name)
        result = evaluate_task(
            model, ctx.bundle, task.name, task.answer_type, test_sets[task.name],
            cfg.eval.batch_size, cfg.eval.max_new_tokens, cfg.eval.rule, hook,
        )
        folder.write_predictions(stage, result, test_sets[task.name])
        results[task.name] = result
        log(f"stage {stage}: {task.name} = {result.score.score:.2f}")
        for note in result.score.notes:
            log(f"stage {stage}: {task.name}: {note}")
    return results


def stage_record(stage: Stage | None, results: dict[str, TaskResult], extra: dict) -> dict:
    return {
        "stage": stage.index if stage else 0,
        "trained_on": [t.name for t in stage.tasks] if stage else [],
        "scores": {name: r.score.score for name, r in results.items()},
        "details": {name: r.score.details for name, r in results.items() if r.score.details},
        "notes": {name: list(r.score.notes) for name, r in results.items() if r.score.notes},
        **extra,
    }


def run(cfg: RunConfig, resume: bool = False) -> Path:
    """Run (or resume) a whole protocol; returns the run folder."""
    from reports.trackers import Trackers, check_trackers

    started = time.time()
    if resume:
        path = reopen_folder(cfg).path
        cfg = RunFolder(path).read_config()
        cfg.out = str(path)
    check_trackers(cfg.report_to)
    suite = get_suite(cfg.suite)
    spec = get_method(cfg.method)
    options = spec.options(cfg.method_options)
    tasks = suite.resolve_order(cfg.order)
    data_root = resolve_data_root(suite, cfg)
    require_valid_data(suite, data_root, tasks, cache_dir() / "verified-images")
    folder = reopen_folder(cfg) if resume else create_folder(cfg)
    trackers = Trackers(cfg.report_to, folder.path, to_dict(cfg))
    test_sets = load_test_sets(suite, tasks, data_root, cfg)
    bundle = load_llava(resolve_model(suite, cfg), cfg.model)
    log(f"model on {device_of(bundle.model)} in {compute_dtype(bundle.model)}")
    ctx = MethodContext(cfg, suite, data_root, bundle, folder.path)
    method: Method = spec.cls(options, ctx)
    stages = method.plan(tasks)
    for stage in stages:
        for task in stage.tasks:
            ctx.train_samples(task)
    names = [t.name for t in tasks]
    checks = degradation.prepare(ctx, tasks, stages)
    done = len(folder.records())
    model = bundle.model
    if done == 0:
        log(f"{cfg.method} on {cfg.suite}: evaluating the starting model on {len(tasks)} tasks")
        set_seed(cfg.seed)
        results = evaluate_all(bundle.model, ctx, tasks, test_sets, 0, folder)
        folder.append_record(stage_record(None, results, checks.measure(bundle.model, 0)))
        trackers.log_stage()
    else:
        trained = folder.last_checkpoint()
        log(f"resuming {folder.path} after stage {done - 1}"
            + (f" (stage {done} trained, not yet evaluated)" if trained == done else ""))
        if trained:
            model = method.load(folder.checkpoint(trained))
    for stage in stages[done - 1 if done else 0 :]:
        model = run_stage(method, model, stage, len(stages), tasks, test_sets, folder, checks)
        folder.write_matrix(names)
        trackers.log_stage()
    matrix = folder.write_matrix(names)
    write_summary(folder, cfg, names, matrix, time.time() - started)
    trackers.finish()
    return folder.path


def run_stage(
    method: Method, model, stage: Stage, total: int, tasks: list[TaskSpec], test_sets: dict,
    folder: RunFolder, checks: degradation.Degradation | None = None,
):
    """Train and consolidate one stage and checkpoint it, then evaluate it (tasks, then general
    benchmarks and probes). A stage already checkpointed (a crash during its evaluation) is only
    evaluated."""
    ctx = method.context
    checkpoint = folder.checkpoint(stage.index)
    peak = PeakMemory(device_of(model))
    t0 = time.time()
    if checkpoint.is_dir():
        log(f"stage {stage.index}/{total}: trained before, evaluating {checkpoint}")
        done = json.loads((checkpoint / TRAINING_FILE).read_text())
    else:
        log(f"stage {stage.index}/{total}: training on {stage.name}")
        set_seed(ctx.config.seed + stage.index)
        model = method.before_stage(model, stage)
        ctx.note_trainable(model)
        trainer_dir = folder.path / "trainer" / f"stage_{stage.index}"
        train_info = train_model(
            model, ctx.bundle, method.training_samples(stage), ctx.config.train, trainer_dir,
            ctx.config.seed + stage.index, method.extra_losses,
            functools.partial(method.before_train_batch, model),
            MethodState(method.state, method.load_state), ctx.config.report_to,
        )
        model = method.after_stage(model, stage)
        done = {"train": train_info, "seconds": round(time.time() - t0, 2), **peak.read("train")}
        folder.write_checkpoint(stage.index, lambda path: method.save(model, path), done)
        shutil.rmtree(trainer_dir, ignore_errors=True)
    t1 = time.time()
    evaluated = method.eval_model(model)
    results = evaluate_all(evaluated, ctx, tasks, test_sets, stage.index, folder, method)
    t2 = time.time()
    measured = checks.measure(evaluated, stage.index, method) if checks else {}
    diagnostics = method.after_evaluation(stage)
    seconds = {"train": done["seconds"], "eval": round(t2 - t1, 2)}
    if measured:
        seconds["general_probes"] = round(time.time() - t2, 2)
    memory = {k: v for k, v in done.items() if k.startswith("peak")} | peak.read("eval")
    extra = {"train": done["train"], "seconds": seconds, **measured}
    if memory:
        extra["memory_gb"] = memory
    if diagnostics:
        extra["method"] = diagnostics
    folder.append_record(stage_record(stage, results, extra))
    previous = folder.checkpoint(stage.index - 1)
    if previous.exists():
        shutil.rmtree(previous)
    return model


class PeakMemory:
    """Peak accelerator memory (GB) of a stage's parts, where there is an accelerator."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)

    def read(self, part: str) -> dict[str, float]:
        if not self.cuda:
            return {}
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        torch.cuda.reset_peak_memory_stats(self.device)
        return {f"peak_{part}": round(peak, 2)}


def write_summary(
    folder: RunFolder, cfg: RunConfig, tasks: list[str], matrix: list[list[float]], wall: float
) -> None:
    from reports.markdown import write_report

    summary = {
        "method": cfg.method,
        "suite": cfg.suite,
        "order": tasks,
        "seed": cfg.seed,
        "quick": cfg.quick,
        **summarize(matrix),
        "final": dict(zip(tasks, matrix[-1], strict=True)),
        "wall_seconds_last_session": round(wall, 1),
    }
    records = folder.records()
    if general := degradation.summary_general(records):
        summary["general"] = general
    if probes := degradation.summary_probes(records):
        summary["probes"] = probes
    (folder.path / "summary.json").write_text(json.dumps(summary, indent=2))
    write_report(folder.path)
    log(f"done: {folder.path} (Avg {summary.get('Avg')}, Last {summary['Last']:.2f})")
