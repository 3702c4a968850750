"""Figures from run folders: accuracy and forgetting matrices, task curves, base-model
degradation across stages, SAC spectra (LLaVA-c Figure 5), and their comparisons across methods.

Each ``*_figure`` function returns a matplotlib figure (or None when the runs hold nothing to
draw); ``write_run_figures`` saves a run's figures as PNG and PDF under ``<run>/figures/``.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from reports.results import Run, read_spectra
from reports.style import HEATMAP, SCORE_RANGE, annotate_cells, pyplot, save, series

RUN_FIGURES = ("matrix", "tasks", "degradation", "spectra")
MAX_GRID_COLUMNS = 4
GRID_TASK_CELLS = 12  # at most this many task columns side by side in a grid of heatmaps


def run_title(run: Run, what: str) -> str:
    quick = " (quick run)" if run.config.get("quick") else ""
    return f"{run.suite}: {run.method}, seed {run.seed}{quick} - {what}"


def stage_labels(run: Run) -> list[str]:
    """``<stage>`` over what it trained on (``start``, a task, or ``N tasks (joint)``)."""
    labels = []
    for r in run.records:
        names = r["trained_on"]
        what = names[0] if len(names) == 1 else f"{len(names)} tasks (joint)" if names else "start"
        labels.append(f"{r['stage']}\n{what}")
    return labels


def change_since_learned(matrix: np.ndarray) -> np.ndarray:
    """C[t][j] = R[t][j] - R[j+1][j] for stages t at or after task j's own stage, else NaN."""
    change = np.full(matrix.shape, np.nan)
    for j in range(min(matrix.shape[1], matrix.shape[0] - 1)):
        change[j + 1 :, j] = matrix[j + 1 :, j] - matrix[j + 1, j]
    return change


def _heatmap(ax, values: np.ndarray, rows: list[str], columns: list[str]):
    low, high = SCORE_RANGE
    image = ax.imshow(values, cmap=HEATMAP, vmin=low, vmax=high, aspect="auto")
    annotate_cells(ax, values, lambda v: v > (low + high) / 2)
    ax.set_xticks(range(len(columns)), columns, rotation=35, ha="right")
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.grid(False)
    return image


def _outline_diagonal(ax, tasks: int, stages: int) -> None:
    """A thick frame around each task's score right after learning it (R[j][j])."""
    from matplotlib.patches import Rectangle

    for j in range(min(tasks, stages - 1)):
        ax.add_patch(Rectangle((j - 0.5, j + 0.5), 1, 1, fill=False, linewidth=2,
                               edgecolor="black"))


def matrix_figure(run: Run):
    """The accuracy matrix and, for a continual run, each task's change since it was learned."""
    plt = pyplot()
    matrix, rows = run.matrix().to_numpy(), stage_labels(run)
    continual = run.kind == "continual" and matrix.shape[0] > 1
    fig, axes = plt.subplots(1, 2 if continual else 1, squeeze=False,
                             figsize=(4 + 1.3 * matrix.shape[1] * (2 if continual else 1),
                                      1.6 + 0.45 * matrix.shape[0]), layout="constrained")
    ax = axes[0][0]
    image = _heatmap(ax, matrix, rows, run.tasks)
    ax.set(xlabel="evaluated task", ylabel="after stage (trained on)",
           title="score (framed: right after learning)")
    fig.colorbar(image, ax=ax, label="score (%)")
    if continual:
        _outline_diagonal(ax, matrix.shape[1], matrix.shape[0])
        change = change_since_learned(matrix)
        bound = max(float(np.nanmax(np.abs(change))), 1.0)
        ax = axes[0][1]
        image = ax.imshow(change, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
        annotate_cells(ax, change, lambda v: abs(v) > 0.6 * bound, "{:+.1f}")
        for (i, j), value in np.ndenumerate(change):
            if np.isnan(value):  # not learned yet: hatched, no number
                ax.add_patch(_hatched_cell(i, j))
        ax.set_xticks(range(len(run.tasks)), run.tasks, rotation=35, ha="right")
        ax.set_yticks(range(len(rows)), [])
        ax.grid(False)
        ax.set(xlabel="evaluated task", title="change since learned (points; hatched: not yet)")
        fig.colorbar(image, ax=ax, label="score change (points)")
    fig.suptitle(run_title(run, "accuracy matrix"))
    return fig


def _hatched_cell(i: int, j: int):
    from matplotlib.patches import Rectangle

    return Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="0.75",
                     linewidth=0)


def task_curves_figure(run: Run):
    """Each task's score after every stage; the stage that trained the task is ringed."""
    plt = pyplot()
    matrix = run.matrix()
    fig, ax = plt.subplots(figsize=(max(5.5, 1.1 * len(matrix) + 3), 3.8))
    stages = list(matrix.index)
    for i, task in enumerate(run.tasks):
        ax.plot(stages, matrix[task], label=task, **series(i))
        learned = [s for s, r in zip(stages, run.records, strict=True) if task in r["trained_on"]]
        ax.plot(learned, matrix.loc[learned, task], linestyle="none", marker="o",
                markersize=11, markerfacecolor="none", markeredgecolor="black")
    ax.set_xticks(stages, stage_labels(run), fontsize=7)
    ax.set(xlabel="after stage (trained on)", ylabel="score (%)",
           title=run_title(run, "each task's score across stages (ringed: its own stage)"))
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def degradation_panels(runs: list[Run]) -> list[tuple[str, str]]:
    """(key, y label) of each panel: each general benchmark's first metric, then the probes."""
    panels: dict[str, str] = {}
    for run in runs:
        for bench, metrics in run.general().items():
            metric = next(iter(metrics))
            panels.setdefault(f"general:{bench}:{metric}", f"{bench} {metric}")
        if any("probes" in r for r in run.records):
            panels.setdefault("probe:mean_words", "probe answer length (mean words)")
            panels.setdefault("probe:language_shift", "language shift (L2 to start)")
    return list(panels.items())


FOOTPRINT_PANELS = [("footprint:kept_bytes", "kept beyond the starting model (MB)"),
                    ("footprint:inference_parameters", "parameters at inference (M)")]
FOOTPRINT_SCALE = {"kept_bytes": 1e-6, "inference_parameters": 1e-6}


def stage_series(run: Run, key: str) -> tuple[list[int], list[float]]:
    """A panel's values of one run: stages and values (stages lacking the value left out)."""
    kind, *name = key.split(":")
    points = []
    for r in run.records:
        if kind == "general":
            value = r.get("general", {}).get(name[0], {}).get(name[1])
        elif kind == "footprint":
            value = r.get("footprint", {}).get(name[0])
            value = None if value is None else value * FOOTPRINT_SCALE[name[0]]
        else:
            value = r.get("probes", {}).get(name[0])
        if value is not None:
            points.append((r["stage"], float(value)))
    return [p[0] for p in points], [p[1] for p in points]


def degradation_figure(groups: dict[str, list[Run]], title: str):
    """General benchmark scores and probe measures across stages (see ``stages_figure``)."""
    return stages_figure(groups, title, degradation_panels(
        [r for runs in groups.values() for r in runs]))


def footprint_figure(groups: dict[str, list[Run]], title: str):
    """What each method keeps, and holds at inference, as tasks accumulate (HiDe-LLaVA Figure 5's
    comparison); None for runs recorded before footprints were."""
    runs = [r for rs in groups.values() for r in rs]
    if not any("footprint" in rec for r in runs for rec in r.records):
        return None
    return stages_figure(groups, title, FOOTPRINT_PANELS, xlabel="tasks learned")


def stages_figure(groups: dict[str, list[Run]], title: str, panels: list[tuple[str, str]],
                  xlabel: str = "after stage"):
    """One panel per ``(key, label)`` of ``stage_series`` across stages, one line per group
    (the mean over its runs, with the sample std as error bars); None without panels."""
    if not panels:
        return None
    plt = pyplot()
    columns = min(len(panels), 3)
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, squeeze=False, figsize=(4.3 * columns, 3.2 * rows),
                             layout="constrained")
    for ax, (key, label) in zip(axes.flat, panels, strict=False):
        for i, (name, runs) in enumerate(groups.items()):
            by_stage: dict[int, list[float]] = {}
            for run in runs:
                for stage, value in zip(*stage_series(run, key), strict=True):
                    by_stage.setdefault(stage, []).append(value)
            if not by_stage:
                continue
            stages = sorted(by_stage)
            means = [np.mean(by_stage[s]) for s in stages]
            errors = [np.std(by_stage[s], ddof=1) if len(by_stage[s]) > 1 else 0.0
                      for s in stages]
            ax.errorbar(stages, means, yerr=errors, label=name, capsize=3, **series(i))
        ax.set(xlabel=xlabel, ylabel=label, title=label)
        ax.xaxis.get_major_locator().set_params(integer=True)
    place_legend(fig, list(axes.flat), len(panels))
    fig.suptitle(title)
    return fig


def place_legend(fig, axes: list, used: int) -> None:
    """One legend for every panel: in the first unused panel, or right of the figure, so that
    it never hides a line however many methods are compared."""
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[used:]:
        ax.axis("off")
    if used < len(axes):
        axes[used].legend(handles, labels, loc="center", ncols=1 + len(labels) // 13)
    else:
        fig.legend(handles, labels, loc="outside right upper")


def spectra_figure(run: Run):
    """LLaVA-c Figure 5 from ``spectra/``: the largest update's singular values before and after
    consolidation (and ModelMix's alpha * s), and the mean per-direction scale s~_i / s_i."""
    spectra = read_spectra(run.path)
    if not spectra:
        return None
    plt = pyplot()
    last = spectra[max(spectra)]
    alpha, kind = last["alpha"], last["consolidation"]
    name, values = max(last["matrices"].items(), key=lambda kv: kv[1]["before"][0])
    before, after = np.array(values["before"]), np.array(values["after"])
    index = np.arange(1, len(before) + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    left.plot(index, before, label="before (raw update)", **series(0))
    left.plot(index, after, label=f"after ({kind}, alpha={alpha:g})", **series(1))
    if kind != "modelmix":
        left.plot(index, alpha * before, label=f"ModelMix alpha*s (alpha={alpha:g})", **series(2))
    left.set(xlabel="singular value index i", ylabel="singular value (log scale)", yscale="log",
             title=f"stage {max(spectra)}, largest update: {name}")
    left.legend()
    for i, (stage, data) in enumerate(sorted(spectra.items())):
        left_values = [np.array(v["after"]) / np.array(v["before"])
                       for v in data["matrices"].values()]
        ratios = _mean_ragged([r[np.isfinite(r)] for r in left_values])
        right.plot(np.arange(1, len(ratios) + 1), ratios, label=f"stage {stage}", **series(i))
    right.axhline(alpha, color="black", linewidth=1, linestyle=":",
                  label=f"ModelMix (uniform {alpha:g})")
    right.set(xlabel="singular value index i",
              ylabel=r"scale $\tilde{s}_i / s_i$ (mean over matrices)",
              title="per-direction scaling, every stage")
    right.legend()
    fig.suptitle(run_title(run, f"spectra of each stage's update ({kind}; LLaVA-c Fig. 5)"))
    return fig


def _mean_ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """Element-wise mean over arrays of different lengths (each position over those having it)."""
    length = max((len(a) for a in arrays), default=0)
    return np.array([np.mean([a[i] for a in arrays if len(a) > i]) for i in range(length)])


def matrix_grid_figure(groups: dict[str, list[Run]], title: str):
    """One accuracy-matrix heatmap per group (mean over its runs) on a shared 0-100 scale."""
    plt = pyplot()
    first = next(iter(groups.values()))[0]
    columns = min(len(groups), MAX_GRID_COLUMNS, max(1, GRID_TASK_CELLS // len(first.tasks)))
    rows = -(-len(groups) // columns)
    width = 1.0 * len(first.tasks) + 1.5
    fig, axes = plt.subplots(rows, columns, squeeze=False,
                             figsize=(width * columns + 1.5, (0.45 * (len(first.tasks) + 1)
                                                               + 2) * rows),
                             layout="constrained")
    image = None
    for ax, (name, runs) in zip(axes.flat, groups.items(), strict=False):
        mean = np.mean([r.matrix().to_numpy() for r in runs], axis=0)
        image = _heatmap(ax, mean, stage_labels(runs[0]), runs[0].tasks)
        if runs[0].kind == "continual":
            _outline_diagonal(ax, mean.shape[1], mean.shape[0])
        ax.set_title(textwrap.fill(f"{name} (n={len(runs)})", 34), fontsize=8)
        ax.set_xlabel("evaluated task")
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    axes[0][0].set_ylabel("after stage")
    fig.colorbar(image, ax=axes, label="score (%)", shrink=0.8)
    fig.suptitle(f"{title}: accuracy matrices (mean over seeds; framed: right after learning)")
    return fig


def run_figures(run: Run) -> dict[str, object]:
    """A run's figures by name (those with something to draw)."""
    figures = {
        "matrix": matrix_figure(run),
        "tasks": task_curves_figure(run) if len(run.records) > 1 else None,
        "degradation": degradation_figure(
            {run.method: [run]}, run_title(run, "general benchmarks and probes across stages")),
        "spectra": spectra_figure(run),
    }
    return {name: fig for name, fig in figures.items() if fig is not None}


def write_run_figures(run_dir: Path) -> list[Path]:
    """Save a run's figures as ``figures/<name>.png`` and ``.pdf``; returns the PNG paths."""
    run = Run(Path(run_dir))
    return [save(fig, run.path / "figures" / name)[0] for name, fig in run_figures(run).items()]


def comparison_figures(tables) -> list[tuple[str, str, object]]:
    """(name, caption, figure) of each leaderboard table's comparison figures: the accuracy
    matrices of its rows side by side, and their general scores and probes across stages."""
    out = []
    for number, table in enumerate(tables, 1):
        groups = {row.label: row.runs for row in table.rows}
        if not groups:
            continue
        out.append((f"table{number}-matrices", f"{table.title}: accuracy matrices",
                    matrix_grid_figure(groups, table.title)))
        degradation = degradation_figure(
            groups, f"{table.title}: general benchmarks and probes across stages")
        if degradation is not None:
            out.append((f"table{number}-degradation",
                        f"{table.title}: general benchmarks and probes", degradation))
        footprint = footprint_figure(groups, f"{table.title}: memory as tasks accumulate")
        if footprint is not None:
            out.append((f"table{number}-footprint", f"{table.title}: memory with tasks",
                        footprint))
    return out
