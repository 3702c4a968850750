"""LLaVA-c Figure 4's regions, read off alpha sweeps (``clbench sweep-alpha``).

LLaVA-c section 4.1 names three regions of the mix ratio alpha for one stage's update:
the General-stable region [0, alpha_1], where raising alpha adds task performance while the
general performance holds; the Task-stable region [alpha_2, 1], where lowering alpha restores
general performance while the task performance holds; and, when alpha_2 <= alpha_1, the Ideal
region [alpha_2, alpha_1]. The paper reads them off its plots. Here "holds" is precise: a score
holds while it stays above its value at the region's fixed end (the general score at alpha 0,
the task score at alpha 1) less ``tolerance`` times the score's swing between alpha 0 and 1.

Sweeps with the same label (the method and the swept options, over several seeds) are averaged
first: the regions are read off the mean curves, and the figure shades one standard deviation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cl_bench.errors import CLBenchError
from reports.alpha_curves import flatten_rows
from reports.results import Run
from reports.style import pyplot, save, series

SWEEP_FOLDER = re.compile(r"stage_(\d+)(?:_(.+))?")


@dataclass(frozen=True)
class Regions:
    """alpha_1 (the General-stable region's end) and alpha_2 (the Task-stable region's start)."""

    general_stable_end: float
    task_stable_start: float

    @property
    def ideal(self) -> tuple[float, float] | None:
        """[alpha_2, alpha_1] when alpha_2 <= alpha_1, else None (no Ideal region)."""
        if self.task_stable_start <= self.general_stable_end:
            return self.task_stable_start, self.general_stable_end
        return None


def holds(values: Sequence[float], anchor: float, other_end: float, tolerance: float) -> list[bool]:
    """Whether each value stays above ``anchor`` less ``tolerance`` x |anchor - other_end|."""
    floor = anchor - tolerance * abs(anchor - other_end)
    return [v >= floor - 1e-9 for v in values]


def find_regions(alphas: Sequence[float], task: Sequence[float], general: Sequence[float],
                 tolerance: float) -> Regions:
    """The regions of one sweep (LLaVA-c section 4.1, Figure 4); alphas must include 0 and 1."""
    points = sorted(zip(alphas, task, general, strict=True))
    if not points or points[0][0] != 0.0 or points[-1][0] != 1.0:
        raise CLBenchError(f"alpha regions need a sweep from alpha 0 to alpha 1, got "
                           f"{[p[0] for p in points]} (sweep with --alphas 0:1:0.1)")
    xs, ts, gs = (list(column) for column in zip(*points, strict=True))
    general_ok = holds(gs, gs[0], gs[-1], tolerance)
    end = next((i for i, ok in enumerate(general_ok) if not ok), len(xs)) - 1
    task_ok = holds(ts, ts[-1], ts[0], tolerance)
    start = len(xs) - next((i for i, ok in enumerate(reversed(task_ok)) if not ok), len(xs))
    return Regions(xs[end], xs[start])


@dataclass
class Sweep:
    """One sweep folder: ``RUN/sweeps/stage_N[_options]``."""

    path: Path
    label: str
    task: str
    frame: pd.DataFrame


def read_sweep(folder: Path, label: str | None = None) -> Sweep:
    """A sweep folder written by ``clbench sweep-alpha``; the label defaults to the run's method
    and the swept options (the folder name's suffix)."""
    match = SWEEP_FOLDER.fullmatch(folder.name)
    file = folder / "alpha.json"
    if not match or not file.is_file():
        raise CLBenchError(f"{folder}: not a sweep folder (expected RUN/sweeps/stage_N[_options] "
                           "holding alpha.json, as clbench sweep-alpha writes)")
    run = Run(folder.parent.parent)
    stage, options = int(match.group(1)), match.group(2)
    trained = [r["trained_on"] for r in run.records if r["stage"] == stage]
    if not trained or len(trained[0]) != 1:
        raise CLBenchError(f"{run.path / 'records.jsonl'}: no stage {stage} trained on one task")
    try:
        rows = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CLBenchError(f"{file}: not JSON ({err.msg})") from None
    frame = flatten_rows(rows, run.tasks)
    name = label or (f"{run.method} ({options.replace('_', ', ')})" if options else run.method)
    return Sweep(folder, name, trained[0][0], frame)


def mean_curves(sweeps: list[Sweep], general: str) -> pd.DataFrame:
    """Per label and alpha: the mean and std over its sweeps of the task and general scores."""
    frames = []
    for sweep in sweeps:
        if general not in sweep.frame:
            known = ", ".join(c for c in sweep.frame.columns if "/" in c) or "none"
            raise CLBenchError(f"{sweep.path}: no general score {general!r} (it has: {known})")
        frames.append(pd.DataFrame({"label": sweep.label, "alpha": sweep.frame["alpha"],
                                    "task": sweep.frame[sweep.task],
                                    "general": sweep.frame[general]}))
    grouped = pd.concat(frames).groupby(["label", "alpha"], sort=False)
    curves = grouped.agg(["mean", "std"])
    curves.columns = [f"{score}_{stat}" for score, stat in curves.columns]
    curves["seeds"] = grouped.size()
    return curves.reset_index()


def regions_table(curves: pd.DataFrame, tolerance: float) -> pd.DataFrame:
    """One row per label: the regions of its mean curves and the scores at alpha 0 and 1."""
    rows = []
    for label, curve in curves.groupby("label", sort=False):
        regions = find_regions(curve["alpha"], curve["task_mean"], curve["general_mean"],
                               tolerance)
        ends = curve.set_index("alpha")
        ideal = regions.ideal
        rows.append({
            "sweep": label, "seeds": int(curve["seeds"].min()),
            "task at 0": ends.loc[0.0, "task_mean"], "task at 1": ends.loc[1.0, "task_mean"],
            "general at 0": ends.loc[0.0, "general_mean"],
            "general at 1": ends.loc[1.0, "general_mean"],
            "alpha_1 (General-stable end)": regions.general_stable_end,
            "alpha_2 (Task-stable start)": regions.task_stable_start,
            "Ideal region": f"[{ideal[0]:g}, {ideal[1]:g}]" if ideal else "none",
        })
    return pd.DataFrame(rows)


def plot_regions(curves: pd.DataFrame, table: pd.DataFrame, task: str, general: str,
                 path: Path) -> list[Path]:
    """Task score (left) and general score (right) against alpha, one line per label (mean,
    +-1 std shaded); alpha_2 marked on the left, alpha_1 on the right (in the line's style),
    Ideal regions hatched; the legend below names each line's regions."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for i, (label, curve) in enumerate(curves.groupby("label", sort=False)):
        style = series(i)
        row = table.set_index("sweep").loc[label]
        a1, a2 = row["alpha_1 (General-stable end)"], row["alpha_2 (Task-stable start)"]
        name = f"{label}: alpha_1 {a1:g}, alpha_2 {a2:g}, Ideal {row['Ideal region']}"
        for ax, score, mark in ((left, "task", a2), (right, "general", a1)):
            mean, std = curve[f"{score}_mean"], curve[f"{score}_std"].fillna(0.0)
            ax.plot(curve["alpha"], mean, label=name, **style)
            ax.fill_between(curve["alpha"], mean - std, mean + std, color=style["color"],
                            alpha=0.12, linewidth=0)
            ax.axvline(mark, color=style["color"], linestyle=style["linestyle"], linewidth=1)
            if a2 <= a1:  # the Ideal region [alpha_2, alpha_1]
                ax.axvspan(a2, a1, color=style["color"], alpha=0.08, hatch="//", linewidth=0)
    left.set(xlabel="mix ratio alpha", ylabel="score",
             title=f"{task} (the swept stage's task); vertical: alpha_2")
    right.set(xlabel="mix ratio alpha", ylabel="score", title=f"{general}; vertical: alpha_1")
    fig.legend(*left.get_legend_handles_labels(), loc="outside lower center",
               ncols=min(2, len(table)))
    fig.suptitle("LLaVA-c Figure 4 regions (hatched: Ideal region)")
    return save(fig, path.with_suffix(""))


def alpha_regions(sweeps: list[Sweep], general: str | None, tolerance: float,
                  out: Path | None) -> str:
    """The regions table as Markdown; with ``out``, also ``alpha_regions.md`` and the figure."""
    if not sweeps:
        raise CLBenchError("alpha regions: give at least one sweep folder")
    if not 0.0 <= tolerance < 1.0:
        raise CLBenchError(f"--tolerance {tolerance}: expected a fraction in [0, 1)")
    tasks = {s.task for s in sweeps}
    if len(tasks) > 1:
        raise CLBenchError(f"the sweeps swept stages of different tasks ({sorted(tasks)}); "
                           "compare sweeps of the same task")
    general = general or next((c for c in sweeps[0].frame.columns if "/" in c), None)
    if general is None:
        raise CLBenchError(f"{sweeps[0].path}: the sweep evaluated no general benchmark")
    curves = mean_curves(sweeps, general)
    table = regions_table(curves, tolerance)
    task = sweeps[0].task
    text = (f"Alpha regions (LLaVA-c Figure 4) of {task}, general score {general}, tolerance "
            f"{tolerance:g} of each score's swing\n\n"
            + table.to_markdown(index=False, floatfmt=("", "", *[".1f"] * 4, "g", "g", "")) + "\n")
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "alpha_regions.md").write_text(text)
        plot_regions(curves, table, task, general, out / "alpha_regions.png")
    return text
