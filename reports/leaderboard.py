"""Leaderboards over many runs: one table per suite and setting, mean +- std over seeds.

Runs are grouped into tables by their *setting* (suite, task order, model, data root, and
whether they are ``--quick`` smoke runs): runs of different settings are never averaged
together. Within a table, a row is a method plus the config keys whose values differ between
the table's runs (so ``llava_c (method.alpha=0.5)`` and ``llava_c (method.alpha=0.2)`` are two
rows); its cells are the mean and the *sample* standard deviation (ddof = 1) over the row's
seeds. Unfinished runs, failed grid runs and repeated seeds are listed under the table, never
averaged. Runs that are not continual (``zeroshot``: no training stage; ``multitask``: one joint
stage) are rows marked as bounds, below the others and never "best".
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from reports.results import FOOTPRINT_COLUMNS, GRID_MANIFEST, METRICS, Run, load_runs

SETTING_KEYS = ("suite", "order", "model", "data_root", "quick")
IGNORED_KEYS = {"out", "seed", "method", *SETTING_KEYS}
LOWER_IS_BETTER = {"Forgetting", *FOOTPRINT_COLUMNS}
DROP = " drop"  # suffix of a general benchmark's drop column: start minus final, lower is better
BOUND_NAMES = {"zero-shot": "bound: zero-shot", "joint": "bound: joint training"}
DECIMALS = 2  # printed precision of every cell
STD_NOTE = "mean ± sample std (ddof = 1) over seeds; n = number of seeds"


@dataclass
class Cell:
    """The values of one metric over a row's seeds."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation (ddof = 1); None for fewer than two seeds."""
        return statistics.stdev(self.values) if self.n > 1 else None


@dataclass
class Row:
    label: str
    method: str
    kind: str
    runs: list[Run]
    cells: dict[str, Cell]

    @property
    def bound(self) -> bool:
        return self.kind != "continual"

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]


@dataclass
class Table:
    title: str
    setting: dict[str, object]
    columns: list[str]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)

    def best(self, column: str) -> float | None:
        """The best mean of a column over the non-bound rows (direction-aware), at the printed
        precision (so that printed ties are all best); None unless two rows have one."""
        means = [round(r.cells[column].mean, DECIMALS) for r in self.rows
                 if not r.bound and column in r.cells and r.cells[column].mean is not None]
        if len(means) < 2:
            return None
        return min(means) if lower_is_better(column) else max(means)

    def is_best(self, row: Row, column: str) -> bool:
        best = self.best(column)
        cell = row.cells.get(column)
        return (not row.bound and best is not None and cell is not None
                and cell.mean is not None and round(cell.mean, DECIMALS) == best)


def lower_is_better(column: str) -> bool:
    return column in LOWER_IS_BETTER or column.endswith(DROP)


def setting_of(run: Run) -> tuple:
    return (run.suite, tuple(run.tasks), run.config.get("model"), run.config.get("data_root"),
            bool(run.config.get("quick")))


def run_values(run: Run, per_task: bool) -> dict[str, float]:
    """The numbers a run contributes to its row: metrics (or final task scores) and the first
    metric of each general benchmark after the last stage, with its drop from stage 0."""
    summary = run.summary or {}
    if per_task:
        values = {t: summary["final"][t] for t in run.tasks}
        values["Last"] = summary.get("Last")
    else:
        values = {m: summary.get(m) for m in METRICS}
        for bench, metrics in run.general().items():
            metric, series = next(iter(metrics.items()))
            name = f"{bench}/{metric}"
            values[name] = series[-1]
            if series[0] is not None and series[-1] is not None:
                values[name + DROP] = series[0] - series[-1]
        values |= run.footprint()
    return {k: float(v) for k, v in values.items() if v is not None}


def differing_keys(runs: list[Run]) -> list[str]:
    """Config keys whose values differ between runs (keys missing in a run count as None)."""
    keys = sorted({k for r in runs for k in r.config} - IGNORED_KEYS)
    return [k for k in keys if len({repr(r.config.get(k)) for r in runs}) > 1]


def row_label(run: Run, shared: list[str], own: list[str]) -> str:
    keys = [k for k in shared if not k.startswith("method.")] + own
    label = run.method
    if keys:
        label += " (" + ", ".join(f"{k}={_value(run.config.get(k), k)}" for k in keys) + ")"
    if run.kind in BOUND_NAMES:
        label += f" [{BOUND_NAMES[run.kind]}]"
    return label


def _value(value: object, key: str) -> str:
    """A config value as a label shows it; a method option a run left unset is its default."""
    if value is None and key.startswith("method."):
        return "default"
    if isinstance(value, tuple):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def build_tables(paths: Iterable[Path | str], per_task: bool = False) -> list[Table]:
    """The leaderboard of every run at or below ``paths`` (run, grid or parent folders)."""
    paths = list(paths)
    runs = load_runs(paths)
    by_setting: dict[tuple, list[Run]] = {}
    for run in runs:
        by_setting.setdefault(setting_of(run), []).append(run)
    titles = _titles(by_setting)
    tables = [make_table(setting, group, per_task, titles[setting])
              for setting, group in sorted(by_setting.items(), key=lambda kv: kv[0][0])]
    failed = grid_failures(paths)
    for table in tables:
        table.notes += [f"failed in its grid: {name}: {error}" for name, (suite, error)
                        in failed.items() if suite == table.setting["suite"]]
    return tables


def _titles(by_setting: dict[tuple, list[Run]]) -> dict[tuple, str]:
    """Each table's title: the suite, plus what sets it apart from other tables of that suite."""
    titles = {}
    for setting in by_setting:
        same_suite = [s for s in by_setting if s[0] == setting[0]]
        parts = [setting[0]]
        for i, key in enumerate(SETTING_KEYS[1:], 1):
            if len({s[i] for s in same_suite}) > 1 and key != "quick":
                value = ",".join(setting[i]) if key == "order" else setting[i]
                parts.append(f"{key} {value}")
        if setting[4]:
            parts.append("quick runs (smoke settings, not comparable to full runs)")
        titles[setting] = " · ".join(str(p) for p in parts)
    return titles


def make_table(setting: tuple, runs: list[Run], per_task: bool, title: str) -> Table:
    suite, tasks, model, data_root, quick = setting
    table = Table(title, {"suite": suite, "order": list(tasks), "model": model,
                          "data_root": data_root, "quick": quick}, [], [])
    finished = [r for r in runs if r.finished]
    for run in runs:
        if not run.finished:
            table.notes.append(f"unfinished, not averaged: {run.path} "
                               f"({max(len(run.records) - 1, 0)} stage(s) done)")
    shared = differing_keys(finished)
    groups: dict[str, list[Run]] = {}
    for run in finished:
        own = differing_keys([r for r in finished if r.method == run.method])
        own = [k for k in own if k.startswith("method.")]
        groups.setdefault(row_label(run, shared, own), []).append(run)
    columns: dict[str, None] = dict.fromkeys([*tasks, "Last"] if per_task else METRICS)
    for label, group in groups.items():
        kept = []
        for run in group:
            twin = next((k for k in kept if k.seed == run.seed), None)
            if twin is not None:
                table.notes.append(f"{label}: seed {run.seed} appears twice ({twin.path} and "
                                   f"{run.path}); only the first is averaged")
            else:
                kept.append(run)
        values = [run_values(r, per_task) for r in kept]
        for v in values:
            columns.update(dict.fromkeys(v))
        cells = {c: Cell([v[c] for v in values if c in v]) for c in columns}
        table.rows.append(Row(label, group[0].method, group[0].kind, kept, cells))
    table.rows.sort(key=lambda r: (r.bound, r.label))
    table.columns = list(columns)
    if not finished:
        table.notes.insert(0, "no finished run")
    return table


def grid_failures(paths: Iterable[Path | str]) -> dict[str, tuple[str, str]]:
    """Runs that a grid manifest (``grid.json``) under ``paths`` marks failed: name -> error."""
    failed = {}
    for path in paths:
        manifest = Path(path) / GRID_MANIFEST
        if manifest.exists():
            grid = json.loads(manifest.read_text())
            for name, entry in grid["runs"].items():
                if entry.get("status") == "failed":
                    failed[f"{Path(path) / name}"] = (entry["config"]["suite"],
                                                      entry.get("error", ""))
    return failed
