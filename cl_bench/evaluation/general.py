"""General benchmarks through lmms-eval, in process, on the model as a method assembles it.

``evaluate_general`` wraps the live model as an lmms-eval model
(``cl_bench.evaluation.lmms_model``, no second copy), runs the named lmms-eval tasks (the micro
world's local ones from ``tasks.micro.bench``, or any task of lmms-eval's own) and writes
``results.json`` and one ``<task>.jsonl`` of predictions per task into the stage's folder.
lmms-eval is an optional extra; ``preserved_global_state`` keeps its side effects (reseeded RNGs,
logging changes, rank variables) out of the training process.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import random
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cl_bench.config import RunConfig
from cl_bench.errors import CLBenchError
from cl_bench.evaluation.generation import BeforeBatch
from cl_bench.evaluation.sharding import on_main
from cl_bench.models.llava import ModelBundle

INSTALL_HINT = "pip install 'cl-bench[lmms]' && pip uninstall -y torchvision"
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


def resolve_benchmarks(given: list[str] | None, suite_default: tuple[str, ...]) -> list[str]:
    """The benchmarks to run: the suite's own when ``given`` is None; ``none`` for none."""
    names = list(suite_default) if given is None else given
    return [n.strip() for n in names if n.strip() and n.strip().lower() != "none"]


def lmms_eval_error() -> str | None:
    """Why lmms-eval cannot be used here, or None if it imports."""
    try:
        import lmms_eval.evaluator  # noqa: F401
    except Exception as err:  # an absent package or a broken install (torchvision)
        return f"{type(err).__name__}: {err}"
    return None


def require_lmms_eval(benchmarks: list[str]) -> None:
    """Import lmms-eval (offline), or fail with a clear message."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with preserved_global_state():
        error = lmms_eval_error()
    if error is not None:
        raise CLBenchError(
            f"general benchmarks {', '.join(benchmarks)} need lmms-eval, which cannot be "
            f"imported ({error}). Install the extra: {INSTALL_HINT}; or pass --general none"
        )
    _quiet_loguru()


def _quiet_loguru() -> None:
    """lmms-eval logs through loguru to stdout; send its warnings to stderr instead."""
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING", format="[lmms-eval] {level}: {message}")


@dataclass
class _LoggerState:
    level: int
    handlers: list
    propagate: bool
    disabled: bool


@contextmanager
def preserved_global_state() -> Iterator[None]:
    """Restore python/numpy/torch RNG states, logging, warning filters and rank variables.

    Inside, the rank variables say "one process": every rank of a process group runs lmms-eval
    alone on the same requests, and the bridge shares the generation out over the ranks.
    """
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    loggers = {
        name: _LoggerState(lg.level, list(lg.handlers), lg.propagate, lg.disabled)
        for name, lg in [("", logging.getLogger()), *logging.Logger.manager.loggerDict.items()]
        if isinstance(lg, logging.Logger)
    }
    filters = list(warnings.filters)
    ranks = {k: os.environ.get(k) for k in RANK_VARIABLES}
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    try:
        yield
    finally:
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        for name, state in loggers.items():
            lg = logging.getLogger(name or None)
            lg.setLevel(state.level)
            lg.handlers[:] = state.handlers
            lg.propagate, lg.disabled = state.propagate, state.disabled
        warnings.filters[:] = filters
        for key, value in ranks.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def evaluate_general(
    model: torch.nn.Module,
    bundle: ModelBundle,
    benchmarks: list[str],
    data_root: Path,
    cfg: RunConfig,
    out_dir: Path,
    before_batch: BeforeBatch | None = None,
) -> dict[str, dict[str, float | None]]:
    """Run lmms-eval tasks on ``model``; scores by task (groups and their subtasks), by metric.

    Writes ``results.json`` and ``<task>.jsonl`` (one prediction per document) to ``out_dir``.
    ``before_batch`` is the method's hook, called before each generation batch.
    """
    if not benchmarks:
        return {}
    require_lmms_eval(benchmarks)
    from tasks.micro.bench import LOCAL_BENCHMARKS, write_local_task

    with tempfile.TemporaryDirectory(prefix="clbench-lmms-") as tmp, preserved_global_state():
        task_dir = Path(tmp) / "tasks"
        task_dir.mkdir()
        for name in benchmarks:
            if name in LOCAL_BENCHMARKS:
                write_local_task(
                    LOCAL_BENCHMARKS[name], data_root, task_dir, cfg.eval.rule, Path(tmp) / "hf"
                )
        results = _run_lmms_eval(model, bundle, benchmarks, task_dir, cfg, before_batch)
    scores = metric_table({**results.get("results", {}), **results.get("groups", {})})
    groups = results.get("group_subtasks", {})
    missing = [b for b in benchmarks if b not in scores and b not in groups]
    if missing:
        raise CLBenchError(f"lmms-eval returned no results for {', '.join(missing)}")
    on_main(lambda: write_results(out_dir, scores, results.get("samples", {})))
    return scores


def _run_lmms_eval(
    model: torch.nn.Module, bundle: ModelBundle, benchmarks: list[str], task_dir: Path,
    cfg: RunConfig, before_batch: BeforeBatch | None,
) -> dict:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from cl_bench.evaluation.lmms_model import ClBenchLMM

    builtin = [b for b in benchmarks if not (task_dir / f"{b}.yaml").exists()]
    manager = TaskManager(
        "WARNING", include_path=str(task_dir), include_defaults=bool(builtin)
    )
    for name in benchmarks:
        if name not in manager.all_tasks:
            raise unknown_benchmark(name, manager.all_tasks)
    lm = ClBenchLMM(model, bundle, cfg.eval.batch_size, cfg.eval.max_new_tokens, before_batch,
                    cfg.eval.workers)
    try:
        results = simple_evaluate(
            model=lm, tasks=list(benchmarks), task_manager=manager, limit=cfg.eval.limit,
            bootstrap_iters=0, log_samples=True, verbosity="WARNING",
            random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
            fewshot_random_seed=cfg.seed, distributed_executor_backend="torchrun",
        )
    except CLBenchError:
        raise
    except Exception as err:  # lmms-eval's own failures: no data offline, a broken task
        cause = _root_cause(err)
        raise CLBenchError(
            f"lmms-eval failed on {', '.join(benchmarks)}: {type(cause).__name__}: {cause} "
            "(its datasets must be in the Hugging Face cache: cl-bench runs it offline)"
        ) from err
    if not results:
        raise CLBenchError(f"lmms-eval returned nothing for {', '.join(benchmarks)}")
    return results


def _root_cause(err: BaseException) -> BaseException:
    """The error inside lmms-eval's retry wrapper (tenacity's RetryError), if any."""
    attempt = getattr(err, "last_attempt", None)
    inner = attempt.exception() if attempt is not None else None
    return inner if isinstance(inner, BaseException) else err


def unknown_benchmark(name: str, known: list[str]) -> CLBenchError:
    """An unknown task name, with the closest lmms-eval and micro task names."""
    from tasks.micro.bench import LOCAL_BENCHMARKS

    candidates = sorted({*known, *LOCAL_BENCHMARKS})
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return CLBenchError(
        f"unknown lmms-eval task {name!r}.{hint} The micro world's: "
        f"{', '.join(LOCAL_BENCHMARKS)}; lmms-eval's own: see `lmms-eval --tasks list`"
    )


def metric_table(results: dict) -> dict[str, dict[str, float | None]]:
    """lmms-eval's ``results`` as task -> metric -> value (``acc,none`` -> ``acc``; ``acc,f`` ->
    ``acc/f``); standard errors, aliases and non-numbers are left out, NaN becomes None."""
    table: dict[str, dict[str, float | None]] = {}
    for task, metrics in results.items():
        row = {}
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if "_stderr" in metric or isinstance(value, bool):
                continue
            if not isinstance(value, int | float):
                continue
            name = metric if filter_name in ("", "none") else f"{metric}/{filter_name}"
            row[name] = None if math.isnan(value) else float(value)
        table[task] = row
    return table


def write_results(out_dir: Path, scores: dict, samples: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(scores, indent=2))
    for task, rows in samples.items():
        with open(out_dir / f"{task}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(sample_row(row)) + "\n")


def sample_row(row: dict) -> dict:
    """One lmms-eval sample log entry, reduced to JSON: ids, prediction, target."""
    doc = row.get("doc") or {}
    prediction = row.get("filtered_resps") or row.get("resps") or [""]
    while isinstance(prediction, list | tuple):
        prediction = prediction[0] if prediction else ""
    out = {"doc_id": row.get("doc_id")}
    for key in ("question_id", "text", "category", "references"):
        if isinstance(doc.get(key), str | list):
            out[key] = doc[key]
    out["prediction"] = prediction if isinstance(prediction, str) else str(prediction)
    target = row.get("target")
    out["target"] = target if isinstance(target, str | int | float | list) else str(target)
    return out
