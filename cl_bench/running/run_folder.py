"""The run folder: the contract between the runner, resume and reports.

``config.yaml``, ``matrix.csv``, ``records.jsonl`` (one line per completed stage),
``summary.json``, ``predictions/stage_<t>/<task>.jsonl``, ``report.md`` and
``checkpoints/stage_<t>/`` (the latest trained stage, written before its evaluation; the one
before it is removed once that evaluation is recorded). A checkpoint folder appears whole (it is
written under another name, then renamed), so its presence means the stage's training is kept.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from cl_bench.config import RunConfig, from_dict, to_dict
from cl_bench.errors import CLBenchError
from cl_bench.evaluation.generation import TaskResult
from tasks.loaders import Sample

TRAINING_FILE = "training.json"  # in a checkpoint: the stage's training metrics and time


@dataclass
class RunFolder:
    """Reads and writes the files of one run."""

    path: Path

    def records(self) -> list[dict]:
        file = self.path / "records.jsonl"
        if not file.exists():
            return []
        return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]

    def append_record(self, record: dict) -> None:
        with open(self.path / "records.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def write_config(self, cfg: RunConfig) -> None:
        (self.path / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    def read_config(self) -> RunConfig:
        return from_dict(yaml.safe_load((self.path / "config.yaml").read_text()), "config.yaml")

    def write_predictions(self, stage: int, result: TaskResult, samples: list[Sample]) -> None:
        folder = self.path / "predictions" / f"stage_{stage}"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{result.task}.jsonl", "w") as f:
            for s in samples:
                row = {
                    "question_id": s.id,
                    "question": s.question,
                    "prediction": result.predictions[s.id],
                    "references": list(s.references),
                    "score": result.score.per_sample.get(s.id),
                }
                f.write(json.dumps(row) + "\n")

    def write_matrix(self, tasks: list[str]) -> list[list[float]]:
        rows = self.records()
        lines = [",".join(["stage", "trained_on", *tasks])]
        for r in rows:
            scores = [f"{r['scores'][t]:.2f}" for t in tasks]
            lines.append(",".join([str(r["stage"]), "+".join(r["trained_on"]) or "-", *scores]))
        (self.path / "matrix.csv").write_text("\n".join(lines) + "\n")
        return [[r["scores"][t] for t in tasks] for r in rows]

    def checkpoint(self, stage: int) -> Path:
        return self.path / "checkpoints" / f"stage_{stage}"

    def last_checkpoint(self) -> int:
        """The latest stage with a complete checkpoint (0: none)."""
        folder = self.path / "checkpoints"
        stages = [int(p.name.removeprefix("stage_")) for p in folder.glob("stage_*")
                  if p.is_dir() and p.name.removeprefix("stage_").isdigit()] \
            if folder.is_dir() else []
        return max(stages, default=0)

    def write_checkpoint(self, stage: int, write: Callable[[Path], None], training: dict) -> Path:
        """Write stage ``stage``'s checkpoint (``write(folder)`` plus the training record),
        appearing at its final path only once complete."""
        final = self.checkpoint(stage)
        staging = final.with_name(final.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        write(staging)
        (staging / TRAINING_FILE).write_text(json.dumps(training))
        staging.rename(final)
        return final


def run_path(cfg: RunConfig) -> Path:
    return Path(cfg.out or f"runs/{cfg.suite}-{cfg.method}-seed{cfg.seed}").expanduser()


def reopen_folder(cfg: RunConfig) -> RunFolder:
    """The run folder to resume."""
    path = run_path(cfg)
    if not (path / "config.yaml").exists():
        raise CLBenchError(f"--resume: {path} holds no run (no config.yaml)")
    return RunFolder(path)


def create_folder(cfg: RunConfig) -> RunFolder:
    """A new run folder with its config; never overwrites a run already there."""
    path = run_path(cfg)
    if (path / "records.jsonl").exists():
        raise CLBenchError(
            f"run folder {path} already holds a run: use --resume to continue it, "
            "or --out for a new folder"
        )
    path.mkdir(parents=True, exist_ok=True)
    folder = RunFolder(path)
    folder.write_config(cfg)
    return folder
