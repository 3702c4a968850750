"""CKA tables and heatmaps (HiDe-LLaVA Figure 1, appendix B) from computed layer similarities."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from reports.markdown import markdown_table


@dataclass(frozen=True)
class CkaRow:
    """Linear CKA at one layer (1 = bottom) between model A on task A and model B on task B."""

    model_a: str
    task_a: str
    model_b: str
    task_b: str
    layer: int
    cka: float

    @property
    def pair(self) -> str:
        same_model = self.model_a == self.model_b
        left = self.task_a if same_model else f"{self.model_a}:{self.task_a}"
        right = self.task_b if same_model else f"{self.model_b}:{self.task_b}"
        return f"{left} vs {right}"


def pairs_by_layer(rows: list[CkaRow]) -> tuple[list[str], list[int], list[list[float]]]:
    """Pair labels, layers, and the pair x layer matrix of CKA values."""
    pairs = list(dict.fromkeys(r.pair for r in rows))
    layers = sorted({r.layer for r in rows})
    value = {(r.pair, r.layer): r.cka for r in rows}
    return pairs, layers, [[value[(p, layer)] for layer in layers] for p in pairs]


def write_csv(rows: list[CkaRow], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model_a", "task_a", "model_b", "task_b", "layer", "cka"])
        for r in rows:
            writer.writerow([r.model_a, r.task_a, r.model_b, r.task_b, r.layer, f"{r.cka:.6f}"])
    return path


def markdown(rows: list[CkaRow], title: str) -> str:
    """Pairs as rows, layers as columns, plus each pair's mean below the top and at the top."""
    pairs, layers, matrix = pairs_by_layer(rows)
    header = ["pair", *[f"L{layer}" for layer in layers], "mean below top", "top"]
    body = []
    for pair, values in zip(pairs, matrix, strict=True):
        below = values[:-1]
        mean_below = f"{sum(below) / len(below):.3f}" if below else "-"
        body.append([pair, *[f"{v:.3f}" for v in values], mean_below, f"{values[-1]:.3f}"])
    return f"# {title}\n\n" + markdown_table(header, body) + "\n"


def task_matrix(rows: list[CkaRow], layer: int) -> tuple[list[str], list[list[float]]]:
    """Task x task CKA at one layer (diagonal 1: a representation with itself)."""
    tasks = list(dict.fromkeys([r.task_a for r in rows] + [r.task_b for r in rows]))
    index = {t: i for i, t in enumerate(tasks)}
    matrix = [[1.0 if i == j else float("nan") for j in tasks] for i in tasks]
    for r in rows:
        if r.layer == layer:
            matrix[index[r.task_a]][index[r.task_b]] = r.cka
            matrix[index[r.task_b]][index[r.task_a]] = r.cka
    return tasks, matrix


def plot(rows: list[CkaRow], out: Path, title: str) -> list[Path]:
    """``cka.png`` (pairs x layers heatmap) and, for three or more tasks, ``cka_layers.png``
    (task x task heatmaps at the bottom, middle and top layers, as HiDe-LLaVA Figure 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs, layers, matrix = pairs_by_layer(rows)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(layers) + 3), max(2, 0.4 * len(pairs) + 1.5)))
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="YlGnBu", aspect="auto")
    ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_yticks(range(len(pairs)), pairs, fontsize=7)
    ax.set_xlabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="linear CKA")
    fig.tight_layout()
    paths = [out / "cka.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    tasks = {r.task_a for r in rows} | {r.task_b for r in rows}
    if len(tasks) >= 3:
        chosen = sorted({layers[0], layers[len(layers) // 2], layers[-1]})
        fig, axes = plt.subplots(1, len(chosen), figsize=(4.2 * len(chosen), 4))
        for ax, layer in zip(list(getattr(axes, "flat", [axes])), chosen, strict=True):
            names, values = task_matrix(rows, layer)
            image = ax.imshow(values, vmin=0, vmax=1, cmap="YlGnBu")
            ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
            ax.set_yticks(range(len(names)), names, fontsize=7)
            ax.set_title(f"layer {layer}")
        fig.colorbar(image, ax=list(getattr(axes, "flat", [axes])), label="linear CKA")
        paths.append(out / "cka_layers.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def write_cka_report(rows: list[CkaRow], out: Path, title: str) -> list[Path]:
    """CSV, markdown table and heatmaps of the rows under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    md = out / "cka.md"
    md.write_text(markdown(rows, title))
    return [write_csv(rows, out / "cka.csv"), md, *plot(rows, out, title)]
