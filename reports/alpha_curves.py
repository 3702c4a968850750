"""Alpha curves (LLaVA-c Figure 4): task and general scores against the mix ratio alpha."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


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


def plot_alpha_curves(frame: pd.DataFrame, tasks: list[str], path: Path) -> Path:
    """Task scores (and general scores, if any) against alpha, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    general = [c for c in frame.columns if "/" in c and frame[c].notna().any()]
    fig, axes = plt.subplots(1, 2 if general else 1, figsize=(11 if general else 6, 4))
    axes = axes if general else [axes]
    for task in [*tasks, "task_mean"]:
        axes[0].plot(frame["alpha"], frame[task], marker="o", label=task,
                     linewidth=2.5 if task == "task_mean" else 1.2)
    axes[0].set(xlabel="alpha", ylabel="score", title="tasks")
    axes[0].legend(fontsize=7)
    for column in general:
        axes[1].plot(frame["alpha"], frame[column], marker="o", label=column)
    if general:
        axes[1].set(xlabel="alpha", ylabel="score", title="general")
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
