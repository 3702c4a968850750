"""Measure the micro world against its targets (shared/spec/micro-world.md, section 3).

For each ucit-micro task: the base model's zero-shot score and its score after training on that
task alone (one finetune stage from the base model). Prints a table and writes
``<out>/targets.json``. Run ``clbench base build`` first to time the base build.

    python benchmarks/micro_targets.py --out runs/targets
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cl_bench.config import resolve
from cl_bench.registry import get_suite
from cl_bench.running.runner import run

SUITE = "ucit-micro"


def task_alone(task_letter: str, out: Path, seed: int, overrides: list[str]) -> dict:
    """A one-stage finetune run on one task: its zero-shot and after-training scores."""
    suite = get_suite(SUITE)
    cfg = resolve(
        None, [*overrides, "general=[]", "probes=false"], lambda name: suite.defaults,
        method="finetune", suite=SUITE, order=task_letter, out=str(out), seed=seed,
    )
    started = time.time()
    folder = run(cfg)
    rows = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
    (task,) = rows[0]["scores"]
    return {
        "task": task,
        "zero_shot": rows[0]["scores"][task],
        "after_own_task": rows[1]["scores"][task],
        "train_seconds": rows[1]["seconds"]["train"],
        "wall_seconds": round(time.time() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/targets"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="config overrides")
    args = parser.parse_args()
    results = [
        task_alone(t.letter, args.out / t.name, args.seed, args.set)
        for t in get_suite(SUITE).tasks
    ]
    print(f"{'task':16} {'zero-shot':>10} {'own task':>10} {'gain':>8} {'train s':>8}")
    for r in results:
        gain = r["after_own_task"] - r["zero_shot"]
        print(f"{r['task']:16} {r['zero_shot']:10.1f} {r['after_own_task']:10.1f} {gain:8.1f} "
              f"{r['train_seconds']:8.1f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "targets.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
