"""The README's main path on a shrunken micro world: ``clbench base build`` (generator, tiny CLIP,
tiny LLaVA), then ``clbench run --suite ucit-micro`` with no data root and no model given, so
that the suite's generator and default model are what the run uses."""

from __future__ import annotations

import json
from pathlib import Path

import tasks.micro.base
from cl_bench.cli import main
from tasks.micro.base import BaseBuildConfig, micro_clip_model
from tasks.micro.model import TinyConfig
from tasks.micro.world import MicroWorldConfig

WORLD = MicroWorldConfig(n_train=16, n_test=8, n_general=64, n_inquiry=8, n_probe=4, n_bench=8)
BUILD = BaseBuildConfig(
    tiny=TinyConfig(vision_hidden=32, vision_layers=1, clip_text_layers=1, projection_dim=32,
                    text_hidden=64, text_layers=2, heads=2, intermediate=128, vocab_size=512),
    world=WORLD, clip_steps=4, clip_batch=16, llava_steps=4, llava_batch=8,
)


def test_base_build_then_a_default_run(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("CLBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tasks.micro.base, "MicroWorldConfig", lambda: WORLD)
    monkeypatch.setattr(tasks.micro.base, "BaseBuildConfig", lambda: BUILD)
    assert main(["base", "build"]) == 0
    built = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert built == tmp_path / "cache" / "micro-base" / BUILD.fingerprint() / "llava"
    assert (built / "config.json").is_file() and (built.parent / "build.json").is_file()
    assert (micro_clip_model(tmp_path / "cache") / "config.json").is_file()
    data = tmp_path / "cache" / "micro-data" / WORLD.fingerprint()
    assert json.loads((data / "manifest.json").read_text())["config"]["n_train"] == 16

    out = tmp_path / "run"
    assert main(["run", "--method", "finetune", "--suite", "ucit-micro", "--quick",
                 "--order", "RA", "--out", str(out), "--general", "none",
                 "--set", "train.max_steps=2", "--set", "eval.max_new_tokens=4"]) == 0
    config = (out / "config.yaml").read_text()
    assert "data_root: null" in config and "model: null" in config  # the suite's defaults
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == [0, 1, 2]
    assert [len(r["scores"]) for r in records] == [2, 2, 2]
    assert all("probes" in r for r in records)  # the micro world's probes, at every stage
    rows = [json.loads(line) for line in
            (out / "predictions" / "stage_2" / "ImageNet-R.jsonl").read_text().splitlines()]
    assert len(rows) == WORLD.n_test  # the generated test set, whole
    cached = [p.name for p in (tmp_path / "cache" / "micro-base").iterdir()]
    assert cached == [BUILD.fingerprint()]  # the run used the model built above
