"""One figure style for every plot: readable in black and white (markers, line styles and
hatches tell series apart, not colour alone), labelled axes, PNG and PDF side by side."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))
# Okabe-Ito: distinguishable with colour-vision deficiencies; markers still carry the series
COLOURS = ("#000000", "#E69F00", "#0072B2", "#009E73", "#D55E00", "#CC79A7", "#56B4E9",
           "#F0E442")
HEATMAP = "Greys"  # dark = high score; cell values are printed, so no colour is needed
SCORE_RANGE = (0.0, 100.0)


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "legend.fontsize": 8,
                         "axes.grid": True, "grid.alpha": 0.3, "savefig.bbox": "tight"})
    return plt


def series(i: int) -> dict:
    """Line keywords of the i-th series: colour, marker and line style all differ."""
    return {"color": COLOURS[i % len(COLOURS)], "marker": MARKERS[i % len(MARKERS)],
            "linestyle": LINESTYLES[i % len(LINESTYLES)], "markersize": 5, "linewidth": 1.4}


def save(figure, stem: Path) -> list[Path]:
    """``<stem>.png`` and ``<stem>.pdf``; closes the figure."""
    plt = pyplot()
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    figure.savefig(paths[0], dpi=130)
    figure.savefig(paths[1])
    plt.close(figure)
    return paths


def annotate_cells(ax, values, is_dark: Callable[[float], bool], fmt: str = "{:.1f}") -> None:
    """Print each finite cell's value, white on the cells ``is_dark`` says are dark."""
    import numpy as np

    for (i, j), value in np.ndenumerate(np.asarray(values, dtype=float)):
        if np.isfinite(value):
            ax.text(j, i, fmt.format(value), ha="center", va="center", fontsize=7,
                    color="white" if is_dark(value) else "black")
