"""Alpha curves (LLaVA-c Figure 4): task and general scores against the mix ratio alpha."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from reports.style import pyplot, save, series

MEAN_STYLE = {"color": "0.55", "linestyle": "-", "linewidth": 3.5, "marker": "none", "zorder": 0}


def flatten_rows(rows: list[dict], tasks: list[str]) -> pd.DataFrame:
    """One row per alpha: task scores, their mean, and ``<benchmark>/<metric>`` columns."""
    flat = []
    for row in rows:
        item = {"alpha": row["alpha"], **{t: row[t] for t in tasks}}
        item["task_mean"] = sum(row[t] for t in tasks) / len(tasks)
        for bench, metrics in row.get("general", {}).items():
            item |= {f"{bench}/{metric}": value for metric, value in metrics.items()}
        item["consolidation_seconds"] = row["consolidation_seconds"]
        flat.append(item)
    return pd.DataFrame(flat)


def plot_alpha_curves(frame: pd.DataFrame, tasks: list[str], path: Path, title: str) -> Path:
    """Task scores (and general scores, if any) against alpha: ``path`` (PNG) and a PDF beside."""
    plt = pyplot()
    general = [c for c in frame.columns if "/" in c and frame[c].notna().any()]
    fig, axes = plt.subplots(1, 2 if general else 1, squeeze=False,
                             figsize=(11 if general else 6.5, 4), layout="constrained")
    left = axes[0][0]
    for i, task in enumerate([*tasks, "task_mean"]):
        style = series(i) | (MEAN_STYLE if task == "task_mean" else {})
        left.plot(frame["alpha"], frame[task], label="mean of tasks" if task == "task_mean"
                  else task, **style)
    left.set(xlabel="mix ratio alpha", ylabel="score (%)", title="tasks")
    left.legend()
    if general:
        right = axes[0][1]
        for i, column in enumerate(general):
            right.plot(frame["alpha"], frame[column], label=column, **series(i))
        right.set(xlabel="mix ratio alpha", ylabel="score", title="general benchmarks")
        right.legend()
    fig.suptitle(title)
    save(fig, path.with_suffix(""))
    return path
