import json
from pathlib import Path

import pytest
import yaml

from cl_bench.cli import main
from cl_bench.errors import CLBenchError
from reports.alpha_regions import Regions, find_regions

ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]
TASK = [0.0, 10.0, 18.0, 19.0, 20.0]


def test_regions_hand_computed() -> None:
    # general floor 50 - 0.1 * |50 - 10| = 46: holds at 0 and 0.25 (49), not at 0.5 (45)
    # task floor 20 - 0.1 * |20 - 0| = 18: holds from 0.5 (18) on, not at 0.25 (10)
    regions = find_regions(ALPHAS, TASK, [50, 49, 45, 30, 10], 0.1)
    assert regions == Regions(general_stable_end=0.25, task_stable_start=0.5)
    assert regions.ideal is None
    # the general score holds up to 0.75 (47 >= 46): Ideal region [0.5, 0.75]
    assert find_regions(ALPHAS, TASK, [50, 49, 48, 47, 10], 0.1).ideal == (0.5, 0.75)
    # the regions meet at one alpha (general holds to 0.5, task from 0.5): an Ideal point
    assert find_regions(ALPHAS, TASK, [50, 49, 48, 30, 10], 0.1).ideal == (0.5, 0.5)
    # a region ends at the first miss: recovering later does not extend it
    dipped = find_regions(ALPHAS, [0, 20, 5, 19, 20], [50, 40, 49, 49, 10], 0.1)
    assert dipped == Regions(general_stable_end=0.0, task_stable_start=0.75)
    # the swing is from alpha 0's score, not from zero: floor 20 - 0.1 * |20 - 10| = 19
    assert find_regions(ALPHAS, [10, 12, 18, 19, 20], [50] * 5, 0.1).task_stable_start == 0.75
    # order of the points does not matter; a wider tolerance widens both regions
    assert find_regions(ALPHAS[::-1], TASK[::-1], [10, 30, 45, 49, 50], 0.1) == regions
    # tolerance 0.5: general floor 30 holds to 0.75, task floor 10 from 0.25
    assert find_regions(ALPHAS, TASK, [50, 49, 45, 30, 10], 0.5).ideal == (0.25, 0.75)


def test_regions_need_both_ends() -> None:
    with pytest.raises(CLBenchError, match="from alpha 0 to alpha 1"):
        find_regions([0.0, 0.5], [0, 1], [2, 1], 0.1)


def write_sweep(root: Path, method: str, seed: int, task: list[float], general: list[float],
                options: str = "") -> Path:
    """A run folder whose stage 1 trained on B, with a sweep of stage 1 (as sweep-alpha writes)."""
    run = root / f"{method}-seed{seed}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"method": method, "suite": "s",
                                                     "seed": seed}))
    records = [{"stage": 0, "trained_on": [], "scores": {"A": 1.0, "B": 0.0}},
               {"stage": 1, "trained_on": ["B"], "scores": {"A": 1.0, "B": 5.0}}]
    (run / "records.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    folder = run / "sweeps" / (f"stage_1_{options}" if options else "stage_1")
    folder.mkdir(parents=True)
    rows = [{"alpha": a, "consolidation_seconds": 0.1, "A": 1.0, "B": t,
             "general": {"mme": {"acc": g}, "pope": {"acc": 50.0}}}
            for a, t, g in zip(ALPHAS, task, general, strict=True)]
    (folder / "alpha.json").write_text(json.dumps(rows))
    return folder


def test_alpha_regions_command_averages_seeds_and_draws(tmp_path: Path, capsys) -> None:
    # seed means: task [0, 10, 18, 19, 20], general [50, 49, 48, 47, 10]
    mixed = [write_sweep(tmp_path, "mix", seed, [t + d for t in TASK], [g + d for g in general])
             for seed, d, general in ((0, 1.0, [50, 49, 48, 47, 10]),
                                      (1, -1.0, [50, 49, 48, 47, 10]))]
    plain = write_sweep(tmp_path, "mix", 2, TASK, [50, 49, 45, 30, 10], "sac")
    out = tmp_path / "regions"
    argv = ["alpha-regions", *map(str, mixed), f"SAC={plain}", "--general", "mme/acc",
            "--out", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| ")}
    assert rows["mix"][0] == "2" and rows["mix"][-1] == "[0.5, 0.75]"
    assert rows["SAC"][-3:] == ["0.25", "0.5", "none"]
    assert (out / "alpha_regions.md").read_text() == table
    assert (out / "alpha_regions.png").stat().st_size > 10_000


def test_alpha_regions_clear_errors(tmp_path: Path, capsys) -> None:
    folder = write_sweep(tmp_path, "mix", 0, TASK, [50, 49, 45, 30, 10])
    assert main(["alpha-regions", str(folder), "--general", "mme/f1"]) == 2
    assert "no general score 'mme/f1' (it has: mme/acc, pope/acc)" in capsys.readouterr().err
    assert main(["alpha-regions", str(tmp_path)]) == 2
    assert "not a sweep folder" in capsys.readouterr().err
