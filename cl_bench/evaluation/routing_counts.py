"""Which expert each evaluated sample was routed to: the confusion counts of a routing method,
written to ``routing/stage_<t>.csv`` (evaluated task x expert) for the report."""

from __future__ import annotations

import csv
from pathlib import Path


class RoutingCounts:
    """Per evaluated set (``before_generate``'s label), how many samples went to each expert."""

    def __init__(self, experts: list[str]) -> None:
        self.experts = experts
        self.counts: dict[str, list[int]] = {}

    def add(self, label: str, chosen: list[int]) -> None:
        counts = self.counts.setdefault(label, [0] * len(self.experts))
        for c in chosen:
            counts[c] += 1

    def __bool__(self) -> bool:
        return bool(self.counts)

    def write(self, run_dir: Path, stage: int) -> dict[str, float | None]:
        """Write the evaluated-set x expert counts; return each set's routing accuracy (the
        share routed to the expert of the same name; None where no expert has its name)."""
        accuracy: dict[str, float | None] = {}
        folder = run_dir / "routing"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"stage_{stage}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["evaluated", *self.experts, "routing_accuracy"])
            for label, counts in self.counts.items():
                total = sum(counts)
                right = counts[self.experts.index(label)] if label in self.experts else None
                accuracy[label] = None if right is None or not total else 100.0 * right / total
                shown = "" if accuracy[label] is None else f"{accuracy[label]:.2f}"
                writer.writerow([label, *counts, shown])
        return accuracy
