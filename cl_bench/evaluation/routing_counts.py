"""Which expert each evaluated sample was routed to: the confusion counts of a routing method,
written to ``routing/stage_<t>.csv`` (evaluated task x expert) for the report."""

from __future__ import annotations

import csv
from pathlib import Path

import torch.distributed as dist

from cl_bench.errors import CLBenchError
from cl_bench.evaluation.sharding import on_main, world


class RoutingCounts:
    """Per evaluated set (``before_generate``'s label), how many samples went to each expert.

    Under a process group each rank counts its own share of the batches; the first ``bool`` or
    ``write`` (which every rank calls at the same point) sums them over the ranks.
    """

    def __init__(self, experts: list[str]) -> None:
        self.experts = experts
        self.counts: dict[str, list[int]] = {}
        self._gathered = False

    def add(self, label: str, chosen: list[int]) -> None:
        if self._gathered:
            raise CLBenchError("routing counts added after they were summed over the ranks")
        counts = self.counts.setdefault(label, [0] * len(self.experts))
        for c in chosen:
            counts[c] += 1

    def __bool__(self) -> bool:
        return bool(self.total())

    def total(self) -> dict[str, list[int]]:
        """The counts of every rank (a collective under a process group, done once)."""
        if world()[1] > 1 and not self._gathered:
            parts: list = [None] * world()[1]
            dist.all_gather_object(parts, self.counts)
            total: dict[str, list[int]] = {}
            for part in parts:
                for label, counts in part.items():
                    old = total.get(label, [0] * len(self.experts))
                    total[label] = [a + b for a, b in zip(old, counts, strict=True)]
            self.counts = total
        self._gathered = world()[1] > 1
        return self.counts

    def write(self, run_dir: Path, stage: int) -> dict[str, float | None]:
        """Write the evaluated-set x expert counts (rank 0); return each set's routing accuracy
        (the share routed to the expert of the same name; None where no expert has its name)."""
        self.total()
        return on_main(lambda: self._write(run_dir, stage))

    def _write(self, run_dir: Path, stage: int) -> dict[str, float | None]:
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
