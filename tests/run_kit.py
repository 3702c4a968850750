"""Killing a run at a chosen point and comparing two run folders file by file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cl_bench.running.run_folder import RunFolder
from reports.results import predictions_frame

TIMINGS = ("seconds",)  # record keys that measure time, so differ between sessions

# Quick-run settings under which a stage changes the fixture model's answers (the quick
# defaults' learning rate of 2e-4 over 6 steps leaves them as they were).
LEARNING = ["--set", "train.learning_rate=0.003", "--set", "train.max_steps=12",
            "--set", "train.batch_size=8"]


def kill_after_predictions(monkeypatch: pytest.MonkeyPatch, files: int) -> None:
    """Interrupt the run (as Ctrl-C would) right after it writes its ``files``-th predictions
    file: in the middle of a stage's evaluation, after its training and consolidation."""
    real = RunFolder.write_predictions
    written = []

    def write_then_die(self, *args, **kwargs):
        real(self, *args, **kwargs)
        written.append(args)
        if len(written) == files:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(RunFolder, "write_predictions", write_then_die)


def records_without_timings(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


def files_under(folder: Path) -> dict[str, bytes]:
    """Every file's content by relative path; model cards (README.md, where PEFT names the folder
    the model was loaded from, a resumed run's earlier checkpoint) aside."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "README.md"}


def tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """A safetensors file's tensors and metadata (its header's order may vary by process)."""
    with safe_open(str(path), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, f.metadata()  # noqa: SIM118


def assert_same_files(folder: Path, reference: Path) -> None:
    """The same files, byte for byte (safetensors: the same tensors and metadata)."""
    mine, theirs = files_under(folder), files_under(reference)
    assert mine.keys() == theirs.keys(), folder
    for name, content in theirs.items():
        if name.endswith(".safetensors"):
            (ours, meta), (want, want_meta) = tensors(folder / name), tensors(reference / name)
            assert ours.keys() == want.keys() and meta == want_meta, name
            assert all(torch.equal(ours[k], want[k]) for k in want), name
        else:
            assert mine[name] == content, folder / name


def assert_same_run(run: Path, reference: Path, *stored: str) -> None:
    """The same predictions (every answer, file by file), matrix and records (timings aside),
    and the same files in each of the ``stored`` folders (e.g. ``deltas``)."""
    for folder in ("predictions", *stored):
        assert_same_files(run / folder, reference / folder)
    assert (run / "matrix.csv").read_text() == (reference / "matrix.csv").read_text()
    assert records_without_timings(run) == records_without_timings(reference)


def stage_answers(run: Path, stage: int) -> list[tuple[str, str]]:
    """Every (task, answer) a run stored after ``stage``, in file order."""
    frame = predictions_frame([run], stage)
    return list(zip(frame["task"], frame["prediction"], strict=True))
