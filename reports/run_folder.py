"""Read a run folder (the runner's contract) into plain Python and pandas objects."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from cl_bench.errors import CLBenchError


def read_summary(run_dir: Path) -> dict:
    file = Path(run_dir) / "summary.json"
    if not file.exists():
        raise CLBenchError(f"{run_dir} has no summary.json: is it a finished cl-bench run?")
    return json.loads(file.read_text())


def read_records(run_dir: Path) -> list[dict]:
    file = Path(run_dir) / "records.jsonl"
    if not file.exists():
        raise CLBenchError(f"{run_dir} has no records.jsonl: is it a cl-bench run folder?")
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def read_matrix(run_dir: Path) -> pd.DataFrame:
    """The accuracy matrix: one row per stage (0 = starting model), one column per task."""
    frame = pd.read_csv(Path(run_dir) / "matrix.csv", index_col="stage")
    return frame.drop(columns=["trained_on"])
