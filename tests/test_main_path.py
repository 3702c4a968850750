"""The README's main path on the small micro world: ``clbench base build`` (finding the build of
the session's small preset), then ``clbench run --suite ucit-micro`` with no data root and no
model given, so that the suite's generator and default model are what the run uses."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from cl_bench.cli import main
from tasks.micro.base import PRESET_VARIABLE, SMALL, build_fingerprint


def test_base_build_then_a_default_run(small_base: Path, tmp_path: Path, monkeypatch,
                                       capsys) -> None:
    cache = small_base.parent.parent  # CACHE/micro-base/<fingerprint>
    monkeypatch.setenv("CLBENCH_CACHE", str(cache))
    monkeypatch.setenv(PRESET_VARIABLE, "small")
    assert main(["base", "build"]) == 0
    built = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert built.parent == small_base and small_base.name == build_fingerprint(SMALL)

    out = tmp_path / "run"
    assert main(["run", "--method", "finetune", "--suite", "ucit-micro", "--quick",
                 "--order", "RA", "--out", str(out), "--general", "none",
                 "--set", "train.max_steps=2", "--set", "eval.max_new_tokens=4"]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["data_root"] is None and config["model"]["path"] is None  # suite's defaults
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == [0, 1, 2]
    assert [len(r["scores"]) for r in records] == [2, 2, 2]
    assert all("probes" in r for r in records)  # the micro world's probes, at every stage
    rows = [json.loads(line) for line in
            (out / "predictions" / "stage_2" / "ImageNet-R.jsonl").read_text().splitlines()]
    assert len(rows) == min(config["eval"]["limit"], SMALL.world.n_test)  # generated, --quick
    assert all(r["question_id"].startswith("ImageNet-R-test-") for r in rows)
    cached = [p.name for p in (cache / "micro-base").iterdir()]
    assert cached == [build_fingerprint(SMALL)]  # the run used the model built above
