"""Run folders as pandas DataFrames, for notebooks, the leaderboard and the figures.

Give any mix of run folders, grid folders (``grid.json``) and folders holding runs; every
function finds the run folders below them (``find_runs``). Reads the run folder contract only
(``config.yaml``, ``records.jsonl``, ``summary.json``, ``predictions/``, ``spectra/``).

Columns (every frame starts with ``run`` (the folder's path), ``method``, ``suite``, ``seed``):

- ``runs_frame``: one row per run: ``name`` (folder name), ``status`` (``finished`` or
  ``unfinished``: no summary.json yet), ``kind`` (``continual``, ``zero-shot``: no training
  stage, or ``joint``: a stage trained on several tasks at once, as multitask), ``quick``,
  ``order`` (task names joined by ``,``), ``model``, ``data_root``, ``stages_done`` (stages
  after stage 0 with a record), ``Avg`` ... ``Forgetting`` (summary.json; None where undefined or
  unfinished), ``general/<bench>/<metric>`` (the value after the last stage) and
  ``general/<bench>/<metric>/start`` (stage 0), ``probes/<name>`` (the last stage's probe numbers).
- ``matrix_frame``: one row per run, stage and task: ``stage``, ``trained_on`` (``+``-joined),
  ``task``, ``score``.
- ``records_frame``: one row per run and stage: ``stage``, ``trained_on``, ``train_loss``,
  ``train/<term>`` (extra loss terms, e.g. ``train/uir``), ``train_seconds``, ``eval_seconds``,
  and the stage's footprint (``cl_bench.models.footprint``): ``trainable_parameters``,
  ``inference_parameters``, ``inference_bytes``, ``kept_bytes``.
- ``general_frame``: one row per run, stage, benchmark and metric: ``stage``, ``benchmark``,
  ``metric``, ``value``.
- ``probes_frame``: one row per run and probed stage: ``stage`` and the probe numbers
  (``mean_words``, ``length_ratio``, ``median_words``, ``short_share``, ``one_word_share``,
  ``option_share``, ``learned_format_share``, ``start_learned_format_share``, ``language_shift``).
- ``predictions_frame``: one row per generated answer: ``stage``, ``task``, ``question_id``,
  ``question``, ``prediction``, ``references`` (a list), ``score``.
- ``spectra_frame``: one row per singular value of a stored stage update (llava_c family):
  ``stage``, ``matrix`` (module name), ``index`` (1-based), ``before`` (the raw update's),
  ``after`` (the consolidated update's), ``consolidation``, ``alpha``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd
import yaml

from cl_bench.errors import CLBenchError

METRICS = ("Avg", "Last", "MFT", "MAA", "BWT", "FWT", "Forgetting")
FOOTPRINT_COLUMNS = ("Trained (M)", "Added at inference (M)", "Kept (MB)")
PROBE_NUMBERS = (
    "mean_words", "length_ratio", "median_words", "short_share", "one_word_share", "option_share",
    "learned_format_share", "start_learned_format_share", "language_shift",
)
GRID_MANIFEST = "grid.json"
MAX_DEPTH = 4  # how deep find_runs looks for run folders below a given folder


def flatten(data: dict, prefix: str = "") -> dict[str, object]:
    """A nested mapping as dotted keys; ``method_options`` become ``method.<name>``."""
    flat: dict[str, object] = {}
    for key, value in data.items():
        name = "method" if key == "method_options" and not prefix else f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = tuple(value) if isinstance(value, list) else value
    return flat


@dataclass
class Run:
    """One run folder, read lazily."""

    path: Path

    @cached_property
    def _config_file(self) -> dict:
        file = self.path / "config.yaml"
        try:
            return yaml.safe_load(file.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise CLBenchError(f"{file}: not a readable run config ({err})") from None

    @cached_property
    def config(self) -> dict[str, object]:
        """The resolved config as dotted keys (``train.learning_rate``, ``method.alpha``)."""
        return flatten({k: v for k, v in self._config_file.items() if k != "environment"})

    @property
    def environment(self) -> dict:
        """What the run started on (versions, device, dtype, processes, code, base model)."""
        return self._config_file.get("environment") or {}

    @cached_property
    def records(self) -> list[dict]:
        file = self.path / "records.jsonl"
        if not file.exists():
            return []
        records = []
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise CLBenchError(f"{file} line {number}: not JSON ({err.msg})") from None
        return records

    @cached_property
    def summary(self) -> dict | None:
        file = self.path / "summary.json"
        return json.loads(file.read_text()) if file.exists() else None

    @property
    def method(self) -> str:
        return str(self.config.get("method"))

    @property
    def suite(self) -> str:
        return str(self.config.get("suite"))

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def tasks(self) -> list[str]:
        if self.summary:
            return list(self.summary["order"])
        return list(self.records[0]["scores"]) if self.records else []

    @property
    def kind(self) -> str:
        """``continual``, ``zero-shot`` (never trained) or ``joint`` (several tasks a stage)."""
        if any(len(r["trained_on"]) > 1 for r in self.records):
            return "joint"
        return "zero-shot" if self.finished and len(self.records) == 1 else "continual"

    def matrix(self) -> pd.DataFrame:
        """Stages (index) x tasks (columns), from the records."""
        rows = {r["stage"]: [r["scores"][t] for t in self.tasks] for r in self.records}
        return pd.DataFrame.from_dict(rows, orient="index", columns=self.tasks).rename_axis("stage")

    def general(self) -> dict[str, dict[str, list[float | None]]]:
        """benchmark -> metric -> one value per stage."""
        out: dict[str, dict[str, list]] = {}
        stages = len(self.records)
        for i, r in enumerate(self.records):
            for bench, metrics in r.get("general", {}).items():
                for metric, value in metrics.items():
                    out.setdefault(bench, {}).setdefault(metric, [None] * stages)[i] = value
        return out

    def footprint(self) -> dict[str, float]:
        """The memory columns (cl_bench.models.footprint): most parameters trained in a stage
        (millions), parameters added at inference since stage 0 (millions) and what the last
        stage's checkpoint keeps beyond the starting model (MB); {} for runs before they were
        recorded."""
        stages = [r["footprint"] for r in self.records if "footprint" in r]
        if len(stages) < 2:
            return {}
        trained = [s["trainable_parameters"] for s in stages[1:] if s["trainable_parameters"]]
        values = {
            FOOTPRINT_COLUMNS[1]: (stages[-1]["inference_parameters"]
                                   - stages[0]["inference_parameters"]) / 1e6,
            FOOTPRINT_COLUMNS[2]: stages[-1]["kept_bytes"] / 1e6,
        }
        if trained:
            values[FOOTPRINT_COLUMNS[0]] = max(trained) / 1e6
        return values

    def identity(self) -> dict[str, object]:
        return {"run": str(self.path), "method": self.method, "suite": self.suite,
                "seed": self.seed}


def find_runs(paths: Iterable[Path | str]) -> list[Path]:
    """Every run folder (one holding ``config.yaml``) at or below ``paths``, in order."""
    found: list[Path] = []
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise CLBenchError(f"{path}: no such folder")
        runs = _walk(path, MAX_DEPTH)
        if not runs and not (path / GRID_MANIFEST).exists():
            raise CLBenchError(f"{path}: no cl-bench run folder (with config.yaml) at or below it")
        found += [r for r in runs if r not in found]
    return found


def _walk(path: Path, depth: int) -> list[Path]:
    if (path / "config.yaml").exists():
        return [path]
    if depth == 0 or not path.is_dir():
        return []
    return [run for child in sorted(path.iterdir()) if child.is_dir()
            for run in _walk(child, depth - 1)]


def load_runs(paths: Iterable[Path | str]) -> list[Run]:
    return [Run(p) for p in find_runs(paths)]


def _as_runs(paths: Iterable[Path | str] | Iterable[Run]) -> list[Run]:
    items = list(paths)
    if items and all(isinstance(i, Run) for i in items):
        return items  # type: ignore[return-value]
    return load_runs(items)  # type: ignore[arg-type]


def runs_frame(paths) -> pd.DataFrame:
    """One row per run (columns in the module docstring)."""
    rows = []
    for run in _as_runs(paths):
        summary = run.summary or {}
        row = {
            **run.identity(), "name": run.path.name,
            "status": "finished" if run.finished else "unfinished", "kind": run.kind,
            "quick": bool(run.config.get("quick")), "order": ",".join(run.tasks),
            "model": run.config.get("model"), "data_root": run.config.get("data_root"),
            "stages_done": max(len(run.records) - 1, 0),
            **{m: summary.get(m) for m in METRICS},
        }
        if run.finished:
            for bench, metrics in run.general().items():
                for metric, values in metrics.items():
                    row[f"general/{bench}/{metric}"] = values[-1]
                    row[f"general/{bench}/{metric}/start"] = values[0]
            probes = [r["probes"] for r in run.records if "probes" in r]
            if probes:
                row |= {f"probes/{k}": probes[-1].get(k) for k in PROBE_NUMBERS}
        rows.append(row)
    return pd.DataFrame(rows)


def matrix_frame(paths) -> pd.DataFrame:
    rows = [
        {**run.identity(), "stage": r["stage"], "trained_on": "+".join(r["trained_on"]),
         "task": task, "score": r["scores"][task]}
        for run in _as_runs(paths) for r in run.records for task in run.tasks
    ]
    return pd.DataFrame(rows, columns=["run", "method", "suite", "seed", "stage", "trained_on",
                                       "task", "score"])


def records_frame(paths) -> pd.DataFrame:
    rows = []
    for run in _as_runs(paths):
        for r in run.records:
            train = r.get("train", {})
            seconds = r.get("seconds", {})
            rows.append({
                **run.identity(), "stage": r["stage"], "trained_on": "+".join(r["trained_on"]),
                "train_loss": train.get("train_loss"),
                **{f"train/{k}": v for k, v in train.items() if k != "train_loss"},
                "train_seconds": seconds.get("train"), "eval_seconds": seconds.get("eval"),
                **r.get("footprint", {}),
            })
    return pd.DataFrame(rows)


def general_frame(paths) -> pd.DataFrame:
    rows = [
        {**run.identity(), "stage": r["stage"], "benchmark": bench, "metric": metric,
         "value": value}
        for run in _as_runs(paths) for r in run.records
        for bench, metrics in r.get("general", {}).items() for metric, value in metrics.items()
    ]
    return pd.DataFrame(rows, columns=["run", "method", "suite", "seed", "stage", "benchmark",
                                       "metric", "value"])


def probes_frame(paths) -> pd.DataFrame:
    rows = [
        {**run.identity(), "stage": r["stage"], **{k: r["probes"].get(k) for k in PROBE_NUMBERS}}
        for run in _as_runs(paths) for r in run.records if "probes" in r
    ]
    return pd.DataFrame(rows, columns=["run", "method", "suite", "seed", "stage",
                                       *PROBE_NUMBERS])


def predictions_frame(paths, stage: int | None = None, task: str | None = None) -> pd.DataFrame:
    """Every stored answer (optionally of one stage and/or task)."""
    rows = []
    for run in _as_runs(paths):
        for folder in sorted((run.path / "predictions").glob("stage_*")):
            number = int(folder.name.removeprefix("stage_"))
            if stage is not None and number != stage:
                continue
            for file in sorted(folder.glob("*.jsonl")):
                if task is not None and file.stem != task:
                    continue
                for line in file.read_text().splitlines():
                    if line.strip():
                        item = json.loads(line)
                        rows.append({**run.identity(), "stage": number, "task": file.stem,
                                     **{k: item.get(k) for k in ("question_id", "question",
                                        "prediction", "references", "score")}})
    return pd.DataFrame(rows, columns=["run", "method", "suite", "seed", "stage", "task",
                                       "question_id", "question", "prediction", "references",
                                       "score"])


def read_spectra(run_dir: Path) -> dict[int, dict]:
    """``spectra/stage_<t>.json`` of a run, by stage."""
    files = (Path(run_dir) / "spectra").glob("stage_*.json")
    return {int(f.stem.removeprefix("stage_")): json.loads(f.read_text()) for f in files}


def spectra_frame(paths) -> pd.DataFrame:
    rows = []
    for run in _as_runs(paths):
        for stage, data in sorted(read_spectra(run.path).items()):
            for name, values in data["matrices"].items():
                rows += [
                    {**run.identity(), "stage": stage, "matrix": name, "index": i + 1,
                     "before": before, "after": after, "consolidation": data["consolidation"],
                     "alpha": data["alpha"]}
                    for i, (before, after) in enumerate(zip(values["before"], values["after"],
                                                            strict=True))
                ]
    return pd.DataFrame(rows, columns=["run", "method", "suite", "seed", "stage", "matrix",
                                       "index", "before", "after", "consolidation", "alpha"])
