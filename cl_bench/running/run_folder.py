"""The run folder: the contract between the runner, resume and reports.

``config.yaml``, ``matrix.csv``, ``records.jsonl`` (one line per completed stage),
``summary.json``, ``predictions/stage_<t>/<task>.jsonl``, ``report.md`` and
``checkpoints/stage_<t>/`` (the latest trained stage, written before its evaluation; the one
before it is removed once that evaluation is recorded). Every file appears whole
(``cl_bench.running.atomic``) and a checkpoint folder is written under another name, then
renamed, so its presence means the stage's training is kept. ``config.yaml`` holds the resolved
config and, under ``environment``, what the run started on (``cl_bench.running.environment``).
Only one process writes a folder: rank 0 under a launcher, holding ``.lock`` (``RunLock``).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from cl_bench.config import RunConfig, from_dict, to_dict
from cl_bench.errors import CLBenchError
from cl_bench.evaluation.generation import TaskResult
from cl_bench.running import atomic
from tasks.loaders import Sample

ENVIRONMENT_KEY = "environment"  # config.yaml's section beside the config

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
        atomic.append_line(self.path / "records.jsonl", json.dumps(record))

    def write_config(self, cfg: RunConfig, environment: dict) -> None:
        data = {**to_dict(cfg), ENVIRONMENT_KEY: environment}
        atomic.write_text(self.path / "config.yaml", yaml.safe_dump(data, sort_keys=False))

    def read_config(self) -> RunConfig:
        data = yaml.safe_load((self.path / "config.yaml").read_text())
        data.pop(ENVIRONMENT_KEY, None)
        return from_dict(data, str(self.path / "config.yaml"))

    def read_environment(self) -> dict:
        """The environment the run started on (or last resumed with --force); {} if unknown."""
        data = yaml.safe_load((self.path / "config.yaml").read_text())
        return data.get(ENVIRONMENT_KEY) or {}

    def write_predictions(self, stage: int, result: TaskResult, samples: list[Sample]) -> None:
        folder = self.path / "predictions" / f"stage_{stage}"
        folder.mkdir(parents=True, exist_ok=True)
        rows = ({
            "question_id": s.id,
            "question": s.question,
            "prediction": result.predictions[s.id],
            "references": list(s.references),
            "score": result.score.per_sample.get(s.id),
        } for s in samples)
        atomic.write_lines(folder / f"{result.task}.jsonl", (json.dumps(r) for r in rows))

    def write_matrix(self, tasks: list[str]) -> list[list[float]]:
        rows = self.records()
        lines = [",".join(["stage", "trained_on", *tasks])]
        for r in rows:
            scores = [f"{r['scores'][t]:.2f}" for t in tasks]
            lines.append(",".join([str(r["stage"]), "+".join(r["trained_on"]) or "-", *scores]))
        atomic.write_lines(self.path / "matrix.csv", lines)
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
    """A new run folder (its config is written once the environment is known); never one that
    already holds a run."""
    path = run_path(cfg)
    if (path / "records.jsonl").exists():
        raise CLBenchError(
            f"run folder {path} already holds a run: use --resume to continue it, "
            "or --out for a new folder"
        )
    path.mkdir(parents=True, exist_ok=True)
    return RunFolder(path)


class RunLock:
    """An exclusive lock on a run folder (``.lock``, an OS lock the kernel releases when the
    process ends, however it ends), so two runs never write one folder."""

    def __init__(self, path: Path) -> None:
        self.file = path / ".lock"
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 1000).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise CLBenchError(
                f"run folder {self.file.parent} is in use by another run ({holder}): wait for "
                "it to end, or give another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None
