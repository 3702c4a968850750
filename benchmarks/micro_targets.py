"""Measure the micro world against every target of shared/spec/micro-world.md and issue 11.

Runs the whole measurement by itself: builds the world and the base model in a fresh cache (timed),
reads the base's stage-0 record, trains each ucit-micro task alone from the base (zero-shot and
own-task scores), runs sequential fine-tuning on all six tasks (timed, with general benchmarks and
probes), then prints one line per target with the measured value and PASS/FAIL, and the load
average of the machine before and after. Writes ``<out>/targets.json``.

    python benchmarks/micro_targets.py --out runs/targets           # the default world and base
    python benchmarks/micro_targets.py --out runs/targets --cache ~/.cache/cl_bench  # reuse a base
    CLBENCH_MICRO_PRESET=small python benchmarks/micro_targets.py --out runs/smoke  # smoke test

The small preset's numbers say nothing about the targets (12 min on 2 cores at load 11-15).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from cl_bench.config import resolve
from cl_bench.registry import get_suite
from cl_bench.running.runner import run
from reports.degradation import probes_section
from tasks.micro.base import PRESET_VARIABLE, base_folder, micro_base_folder, preset
from tasks.micro.fingerprint import REFERENCE, differences, read_record

SUITE = "ucit-micro"
OWN_GAIN = 40.0  # points above zero-shot after training on the task alone
OPTION_OWN = 70.0  # option tasks: accuracy after training on the task alone
GENERAL_ACC = 75.0  # micro MME and POPE accuracy of the base
BUILD_SECONDS = 600.0
RUN_SECONDS = 300.0
FULL_SENTENCE_WORDS = 5.0  # mean words of the base's answers to open probes
SHORT_SHARE = 0.1  # at most this share of the base's probe answers are short phrases
FORGETTING_BWT = -10.0  # sequential fine-tuning forgets: BWT at most this
MME_DROP = 10.0  # ... and micro MME falls by at least this many points
SHRINK = 0.7  # ... and the median probe answer is at most this fraction of the base's
TASK_FORMAT_SHARE = 0.5  # ... and at least this share of probe answers is in a task's format


@dataclass
class Target:
    name: str
    measured: str
    passed: bool


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def one_run(out: Path, seed: int, order: str | None, overrides: list[str]) -> tuple[Path, float]:
    suite = get_suite(SUITE)
    cfg = resolve(None, overrides, lambda name: suite.defaults, method="finetune", suite=SUITE,
                  order=order, out=str(out), seed=seed)
    started = time.time()
    return run(cfg), time.time() - started


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]


def task_alone(letter: str, out: Path, seed: int, overrides: list[str]) -> dict:
    """A one-stage finetune run on one task: its zero-shot and after-training scores."""
    folder, wall = one_run(out, seed, letter, [*overrides, "general=[]", "probes=false"])
    rows = records(folder)
    (task,) = rows[0]["scores"]
    return {"task": task, "zero_shot": rows[0]["scores"][task],
            "own_task": rows[1]["scores"][task], "wall_seconds": round(wall, 1)}


def build_targets(cache: Path) -> tuple[list[Target], dict]:
    was_built = (base_folder(cache, preset()) / "build.json").exists()
    started = time.time()
    folder = micro_base_folder(cache)
    wall = time.time() - started
    started = time.time()
    micro_base_folder(cache)
    cached = time.time() - started
    record = json.loads((folder / "build.json").read_text())
    # a base already in --cache was built earlier: its record holds the time that build took
    built = sum(record["seconds"].values()) if was_built else wall
    stage0 = record["stage0"]
    reference = read_record(REFERENCE)
    same = reference is not None and reference["fingerprint"] == record["fingerprint"]
    diffs = differences(record, reference) if same else ["no reference for this config"]
    targets = [
        Target("base build (world + base) <= 10 min on 2 cores",
               f"{built:.0f} s{' (recorded when it was built)' if was_built else ''} "
               f"(cached: {cached:.1f} s)", built <= BUILD_SECONDS),
        Target(f"base micro MME accuracy >= {GENERAL_ACC:.0f} %",
               f"{stage0['micro_mme_acc']:.1f}", stage0["micro_mme_acc"] >= GENERAL_ACC),
        Target(f"base micro POPE accuracy >= {GENERAL_ACC:.0f} % (balanced yes/no)",
               f"{stage0['micro_pope_acc']:.1f}", stage0["micro_pope_acc"] >= GENERAL_ACC),
        Target("base identical to the reference build (weights, world, stage-0 scores)",
               "identical" if not diffs else "; ".join(diffs), not diffs),
    ]
    return targets, record


def task_targets(results: list[dict]) -> list[Target]:
    targets = []
    types = {t.name: t.answer_type for t in get_suite(SUITE).tasks}
    for r in results:
        gain = r["own_task"] - r["zero_shot"]
        text = f"zero-shot {r['zero_shot']:.1f} -> own task {r['own_task']:.1f} ({gain:+.1f})"
        targets.append(Target(f"{r['task']}: own task >= zero-shot + {OWN_GAIN:.0f}", text,
                              gain >= OWN_GAIN))
        if types[r["task"]] == "option":
            targets.append(Target(f"{r['task']}: own task >= {OPTION_OWN:.0f} %",
                                  f"{r['own_task']:.1f}", r["own_task"] >= OPTION_OWN))
    return targets


def sequence_targets(folder: Path, wall: float, record: dict) -> list[Target]:
    summary = json.loads((folder / "summary.json").read_text())
    rows = records(folder)
    mme = [r.get("general", {}).get("micro_mme", {}).get("acc") for r in rows]
    probes = [r["probes"] for r in rows if "probes" in r]
    start, end = probes[0], probes[-1]
    stage0 = {k: round(v, 2) for k, v in rows[0]["scores"].items()}
    built = {k: round(record["stage0"][k], 2) for k in stage0}
    return [
        Target(f"finetune run on {SUITE} <= 5 min on 2 cores", f"{wall:.0f} s",
               wall <= RUN_SECONDS),
        Target(f"finetune forgets: BWT <= {FORGETTING_BWT:.0f} and Last < Avg",
               f"Avg {summary['Avg']:.1f}, Last {summary['Last']:.1f}, BWT {summary['BWT']:.1f}",
               summary["BWT"] <= FORGETTING_BWT and summary["Last"] < summary["Avg"]),
        Target(f"finetune degrades the base: micro MME falls >= {MME_DROP:.0f} points",
               f"{mme[0]:.1f} -> {mme[-1]:.1f}" if None not in (mme[0], mme[-1]) else f"{mme}",
               None not in (mme[0], mme[-1]) and mme[0] - mme[-1] >= MME_DROP),
        Target("base answers open probes in full sentences (mean words, short share)",
               f"{start['mean_words']:.1f} words, {100 * start['short_share']:.0f} % short",
               start["mean_words"] >= FULL_SENTENCE_WORDS and start["short_share"] <= SHORT_SHARE),
        Target("finetune shortens and task-formats the answers to open probes (median words, "
               "task-format share)",
               f"median {start['median_words']:g} -> {end['median_words']:g} words (mean "
               f"{start['mean_words']:.1f} -> {end['mean_words']:.1f}), task format "
               f"{100 * end['learned_format_share']:.0f} %",
               end["median_words"] <= SHRINK * start["median_words"]
               and end["learned_format_share"] >= TASK_FORMAT_SHARE),
        Target("run's stage-0 scores equal the base record's (two decimals)",
               "equal" if stage0 == built else f"run {stage0} vs build {built}", stage0 == built),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/targets"))
    parser.add_argument("--cache", type=Path, help="reuse this cache (default: a fresh one "
                        "under --out, so that the build is timed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="config overrides")
    args = parser.parse_args()
    cache = (args.cache or args.out / "cache").expanduser()
    os.environ["CLBENCH_CACHE"] = str(cache)
    load_before = load_average()
    targets, record = build_targets(cache)
    results = [task_alone(t.letter, args.out / "alone" / t.name, args.seed, args.set)
               for t in get_suite(SUITE).tasks]
    targets += task_targets(results)
    folder, wall = one_run(args.out / "finetune", args.seed, None, args.set)
    targets += sequence_targets(folder, wall, record)
    load_after = load_average()
    print(f"base {record['fingerprint']} ({os.environ.get(PRESET_VARIABLE, 'default')} preset), "
          f"seed {args.seed}, overrides {args.set or 'none'}")
    width = max(len(t.name) for t in targets)
    for t in targets:
        print(f"{'PASS' if t.passed else 'FAIL'}  {t.name:{width}}  {t.measured}")
    print(f"load average (1, 5, 15 min): before {load_before}; after {load_after}; "
          f"cpus {os.cpu_count()}")
    print(f"\nThe finetune run's open probes after every stage (the shrink target reads the "
          f"last; stage t is the t-th task of {SUITE}):\n")
    print(probes_section(json.loads((folder / "summary.json").read_text())))
    report = {"targets": [vars(t) for t in targets], "tasks": results,
              "load_average": {"before": load_before, "after": load_after}}
    (args.out / "targets.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
