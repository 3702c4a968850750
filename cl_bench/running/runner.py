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

from cl_bench.config import RunConfig, set_key, to_dict
from cl_bench.errors import CLBenchError
from cl_bench.evaluation import degradation
from cl_bench.evaluation.backends import check_backend, task_answerer
from cl_bench.evaluation.generation import TaskResult, scored
from cl_bench.method import Method, MethodContext, Stage
from cl_bench.metrics import summarize
from cl_bench.models.footprint import inference_footprint, tensor_file_bytes, trainable_parameters
from cl_bench.models.llava import load_llava
from cl_bench.models.placement import compute_dtype, device_of, resolve_device
from cl_bench.registry import call_target, get_method, get_suite
from cl_bench.running import atomic
from cl_bench.running.distributed import from_main, init_processes, is_main, on_main, world_size
from cl_bench.running.environment import code_version, environment
from cl_bench.running.launch import check_launcher, launcher_of
from cl_bench.running.run_folder import (
    TRAINING_FILE,
    RunFolder,
    RunLock,
    create_folder,
    reopen_folder,
    run_path,
)
from cl_bench.running.training import MethodState, train_model
from tasks.data_check import require_valid_data
from tasks.loaders import load_test_samples
from tasks.suite import Suite, TaskSpec


def log(message: str) -> None:
    """Progress on stderr, from rank 0 only under a launcher (errors come from every rank)."""
    if is_main():
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
    """Evaluate every task; ``method.before_generate`` sees each batch (after stage 0). Under a
    process group the ranks share the generation and each returns every result."""
    cfg = ctx.config
    results = {}
    with task_answerer(model, ctx.bundle, cfg, method, folder.path) as answer:
        for task in tasks:
            samples = test_sets[task.name]
            result = scored(task.name, task.answer_type, samples, answer(task.name, samples),
                            cfg.eval.rule)
            if is_main():
                folder.write_predictions(stage, result, samples)
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


def run(cfg: RunConfig, resume: bool = False, force: bool = False,
        overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Run (or resume) a whole protocol; returns the run folder.

    Under a launcher every rank runs this; rank 0 alone writes the run folder (holding its
    lock) and evaluates, the others wait for it (``cl_bench.running.distributed``).
    """
    from reports.trackers import Trackers, check_trackers

    started = time.time()
    if resume:
        cfg = resumed_config(cfg, overrides)
    init_processes(resolve_device(cfg.model.device))
    check_trackers(cfg.report_to)
    suite = get_suite(cfg.suite)
    spec = get_method(cfg.method)
    launcher = launcher_of(cfg.train.deepspeed)
    check_launcher(cfg.method, spec.cls.capabilities.launchers, launcher)
    options = spec.options(cfg.method_options)
    check_backend(cfg.eval, cfg.method, spec.cls.capabilities.routes)
    tasks = suite.resolve_order(cfg.order)
    data_root = from_main(lambda: resolve_data_root(suite, cfg))
    on_main(lambda: require_valid_data(suite, data_root, tasks, cache_dir() / "verified-images"))
    model_folder = from_main(lambda: resolve_model(suite, cfg))
    lock = RunLock(run_path(cfg)) if is_main() else None
    try:
        folder = from_main(lambda: open_folder(cfg, resume, lock))
        bundle = load_llava(model_folder, cfg.model)
        log(f"model on {device_of(bundle.model)} in {compute_dtype(bundle.model)} "
            f"({launcher}, {world_size()} process(es))")
        env = environment(bundle.model, model_folder, comparable_config(cfg), launcher)
        on_main(lambda: start_folder(folder, cfg, env, resume, force))
        trackers = Trackers(cfg.report_to if is_main() else [], folder.path, to_dict(cfg))
        ctx = MethodContext(cfg, suite, data_root, bundle, folder.path, writes=is_main())
        run_stages(spec.cls(options, ctx), ctx, tasks, folder, trackers, env)
        names = [t.name for t in tasks]
        on_main(lambda: write_summary(folder, cfg, names, folder.write_matrix(names),
                                      time.time() - started))
        trackers.finish()
    finally:
        if lock is not None:
            lock.release()
    return folder.path


def run_stages(method: Method, ctx: MethodContext, tasks: list[TaskSpec], folder: RunFolder,
               trackers, env: dict) -> None:
    """Evaluate the starting model (unless resuming), then run every stage not yet recorded."""
    cfg, bundle = ctx.config, ctx.bundle
    test_sets = load_test_sets(ctx.suite, tasks, ctx.data_root, cfg)
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
        set_seed(cfg.seed)  # every rank evaluates its share; rank 0 writes
        results = evaluate_all(bundle.model, ctx, tasks, test_sets, 0, folder)
        footprint = {"trainable_parameters": 0, **inference_footprint(bundle.model),
                     "kept_bytes": 0}
        extra = {**checks.measure(bundle.model, 0), "footprint": footprint, "environment": env}
        on_main(lambda: (folder.append_record(stage_record(None, results, extra)),
                         trackers.log_stage()))
    else:
        trained = folder.last_checkpoint()
        log(f"resuming {folder.path} after stage {done - 1}"
            + (f" (stage {done} trained, not yet evaluated)" if trained == done else ""))
        if trained:
            model = method.load(folder.checkpoint(trained))
    for stage in stages[done - 1 if done else 0 :]:
        model = run_stage(method, model, stage, len(stages), tasks, test_sets, folder, checks,
                          env)
        on_main(lambda: (folder.write_matrix(names), trackers.log_stage()))


def keep_record(folder: RunFolder, record: dict, stage: int) -> None:
    """Append the stage's record (with the size of what its checkpoint keeps), then drop the
    previous stage's checkpoint."""
    record["footprint"]["kept_bytes"] = tensor_file_bytes(folder.checkpoint(stage))
    folder.append_record(record)
    previous = folder.checkpoint(stage - 1)
    if previous.exists():
        shutil.rmtree(previous)


def drop_trainer_checkpoints(trainer_dir: Path) -> None:
    """Remove the Trainer's mid-stage checkpoints once the stage is kept; its tracker logs
    (``runs/`` of ``--report-to tensorboard``) stay."""
    for checkpoint in trainer_dir.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    if trainer_dir.is_dir() and not any(trainer_dir.iterdir()):
        trainer_dir.rmdir()


def run_stage(
    method: Method, model, stage: Stage, total: int, tasks: list[TaskSpec], test_sets: dict,
    folder: RunFolder, checks: degradation.Degradation | None = None, env: dict | None = None,
):
    """Train and consolidate one stage and checkpoint it, then evaluate it (tasks, then general
    benchmarks and probes). A stage already checkpointed (a crash during its evaluation) is only
    evaluated. Every rank trains, consolidates and evaluates its share; rank 0 writes."""
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
        trainable = trainable_parameters(model)
        trainer_dir = folder.path / "trainer" / f"stage_{stage.index}"
        train_info = train_model(
            model, ctx.bundle, method.training_samples(stage), ctx.config.train, trainer_dir,
            ctx.config.seed + stage.index, method.extra_losses,
            functools.partial(method.before_train_batch, model),
            MethodState(method.state, method.load_state), ctx.config.report_to,
            functools.partial(method.before_optimizer_step, model),
        )
        model = method.after_stage(model, stage)
        done = {"train": train_info, "seconds": round(time.time() - t0, 2),
                "trainable_parameters": trainable, **peak.read("train")}

        def keep_training() -> None:
            folder.write_checkpoint(stage.index, lambda path: method.save(model, path), done)
            drop_trainer_checkpoints(trainer_dir)

        on_main(keep_training)
    evaluated = method.eval_model(model)

    # every rank evaluates its share of each test set (sharded generation); rank 0 writes
    t1 = time.time()
    results = evaluate_all(evaluated, ctx, tasks, test_sets, stage.index, folder, method)
    t2 = time.time()
    measured = checks.measure(evaluated, stage.index, method) if checks else {}
    diagnostics = method.after_evaluation(stage)
    seconds = {"train": done["seconds"], "eval": round(t2 - t1, 2)}
    if measured:
        seconds["general_probes"] = round(time.time() - t2, 2)
    memory = {k: v for k, v in done.items() if k.startswith("peak")} | peak.read("eval")
    footprint = {"trainable_parameters": done.get("trainable_parameters"),
                 **inference_footprint(evaluated)}
    extra = {"train": done["train"], "seconds": seconds, "footprint": footprint, **measured}
    if memory:
        extra["memory_gb"] = memory
    if diagnostics:
        extra["method"] = diagnostics
    if env:
        extra["environment"] = env
    on_main(lambda: keep_record(folder, stage_record(stage, results, extra), stage.index))
    return model


def open_folder(cfg: RunConfig, resume: bool, lock: RunLock) -> RunFolder:
    """The run folder, locked by this process before anything in it is read or written."""
    if resume:
        reopen_folder(cfg)
    lock.acquire()
    return reopen_folder(cfg) if resume else create_folder(cfg)


def comparable_config(cfg: RunConfig) -> dict:
    """The config as ``--resume`` compares it: everything but where the run folder is."""
    return {k: v for k, v in to_dict(cfg).items() if k != "out"}


def resumed_config(cfg: RunConfig, overrides: list[str] | tuple[str, ...]) -> RunConfig:
    """The config of the run in ``cfg.out``, with ``--set`` overrides applied."""
    folder = reopen_folder(cfg)
    resumed = folder.read_config()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise CLBenchError(f"--set {item!r}: expected key=value")
        set_key(resumed, key.strip(), value, "--set")
    resumed.out = str(folder.path)
    return resumed


def start_folder(folder: RunFolder, cfg: RunConfig, env: dict, resume: bool,
                 force: bool) -> None:
    """Write the config and environment of a new run; on resume, refuse (unless ``force``) a
    config or code version other than the run's, and record a forced change."""
    if not resume:
        folder.write_config(cfg, env)
        return
    before = folder.read_environment()
    if not before:
        log(f"{folder.path}/config.yaml records no environment (an older run): not compared")
        return
    changes = []
    if before.get("config_sha256") != env["config_sha256"]:
        changes.append(f"the config (sha256 {before.get('config_sha256')} -> "
                       f"{env['config_sha256']}: config.yaml edited, or --set given)")
    if code_version(before) != code_version(env):
        changes.append(f"the code version ({code_version(before)} -> {code_version(env)})")
    if not changes:
        return
    what = " and ".join(changes)
    if not force:
        raise CLBenchError(
            f"--resume: {folder.path} started under another {what.removeprefix('the ')}; "
            "continuing would mix them in one run. Start a new run (--out), or add --force to "
            "continue anyway (each stage's record keeps the environment it ran in)"
        )
    log(f"--resume --force: continuing with changed {what}")
    folder.write_config(cfg, env)


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
    atomic.write_text(folder.path / "summary.json", json.dumps(summary, indent=2))
    write_report(folder.path)
    log(f"done: {folder.path} (Avg {summary.get('Avg')}, Last {summary['Last']:.2f})")
