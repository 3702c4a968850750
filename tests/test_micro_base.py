"""The micro base build: determinism across processes and thread counts, its fingerprint record
and the check against a reference, and the README's main path on the small preset."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from cl_bench.models.llava import load_llava
from tasks.micro.base import (
    PRESET_VARIABLE,
    SMALL,
    BaseMismatchWarning,
    build_fingerprint,
    check_base,
)
from tasks.micro.build import BaseBuildConfig
from tasks.micro.fingerprint import differences

ROOT = Path(__file__).resolve().parents[1]


def record_of(folder: Path) -> dict:
    return json.loads((folder / "build.json").read_text())


def test_base_is_identical_across_processes_hash_seeds_and_thread_counts(
    small_base: Path, tmp_path: Path
) -> None:
    """A second build in another process, with another hash seed, thread count and vector
    instruction set (as on another machine), gives the same world, weights and stage-0 scores."""
    threads = "1" if os.environ.get("OMP_NUM_THREADS") == "3" else "3"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": threads,
           "ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "AUTO", "PYTHONPATH": str(ROOT)}
    code = ("import sys; from pathlib import Path; from tasks.micro.base import SMALL, "
            "micro_base_folder; print(micro_base_folder(Path(sys.argv[1]), build=SMALL))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True)
    again = Path(out.stdout.strip().splitlines()[-1])
    mine, theirs = record_of(small_base), record_of(again)
    assert again != small_base and theirs["fingerprint"] == mine["fingerprint"]
    assert theirs["world_sha256"] == mine["world_sha256"]
    assert theirs["weights_sha256"] == mine["weights_sha256"]
    assert theirs["stage0"] == mine["stage0"]
    assert theirs["environment"] == mine["environment"] == {
        "machine": mine["environment"]["machine"], "cpu_capability": "AVX2", "threads": 2}


def test_the_record_names_config_versions_and_every_model(small_base: Path) -> None:
    record = record_of(small_base)
    assert record["fingerprint"] == build_fingerprint(SMALL) == small_base.name
    assert BaseBuildConfig.from_dict(record["config"]) == SMALL
    assert {"torch", "transformers", "tokenizers", "pillow", "python"} <= set(record["versions"])
    assert set(record["weights_sha256"]) == {"clip", "aligned", "llava"}
    assert {"ImageNet-R", "Flickr30k", "micro_mme_acc", "micro_pope_acc"} <= set(record["stage0"])
    phases = {"tokenizer+clip", "chat", "align", "tune", "stage0"}
    assert set(record["seconds"]) == phases and all(v > 0 for v in record["seconds"].values())


def test_the_llava_reads_the_patches_and_the_class_token(small_base: Path) -> None:
    """Model and processor agree on 17 image tokens for 16 patches (a processor left at
    "default" would give 16 and the model would refuse the batch)."""
    bundle = load_llava(small_base / "llava")
    tiny = SMALL.tiny
    patches = (tiny.image_size // tiny.patch_size) ** 2
    inputs = bundle.processor(images=[Image.new("RGB", (tiny.image_size,) * 2)],
                              text=["<image>\nWhat is this?"], return_tensors="pt")
    image_id = bundle.model.config.image_token_id
    assert int((inputs["input_ids"] == image_id).sum()) == patches + 1
    with torch.no_grad():
        features = bundle.model.model.get_image_features(pixel_values=inputs["pixel_values"])
    assert [f.shape[0] for f in features.pooler_output] == [patches + 1]  # one image's tokens


def test_fingerprint_follows_the_config() -> None:
    other = BaseBuildConfig.from_dict({**SMALL.as_dict(), "seed": 1})
    assert build_fingerprint(other) != build_fingerprint(SMALL)
    assert build_fingerprint(BaseBuildConfig.from_dict(SMALL.as_dict())) == build_fingerprint(SMALL)


def test_changed_weights_are_reported(small_base: Path, tmp_path: Path) -> None:
    copy = tmp_path / small_base.name
    shutil.copytree(small_base, copy)
    assert check_base(copy, tmp_path / "no-reference.json") == []
    weights = copy / "llava" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.warns(BaseMismatchWarning, match="its weights changed since it was built"):
        check_base(copy, tmp_path / "no-reference.json")


def test_a_base_unlike_the_reference_is_reported_with_what_differs(
    small_base: Path, tmp_path: Path
) -> None:
    reference = record_of(small_base)
    path = tmp_path / "reference.json"
    path.write_text(json.dumps(reference))
    assert check_base(small_base, path) == []
    reference["stage0"]["ImageNet-R"] += 1.0
    reference["versions"]["torch"] = "0.0.1"
    path.write_text(json.dumps(reference))
    with pytest.warns(BaseMismatchWarning) as caught:
        problems = check_base(small_base, path)
    message = str(caught[0].message)
    assert "stage-0 ImageNet-R is" in message and "torch" in message and "0.0.1" in message
    assert len(problems) == 2
    reference["fingerprint"] = "another-config"
    path.write_text(json.dumps(reference))
    assert check_base(small_base, path) == []  # another config's reference says nothing


def test_differences_are_empty_only_when_weights_world_and_scores_agree() -> None:
    record = {"world_sha256": "w", "weights_sha256": {"llava": "a"}, "stage0": {"R": 10.0},
              "versions": {"torch": "1"}, "environment": {"threads": 1}}
    assert differences(record, json.loads(json.dumps(record))) == []
    assert differences(record, {**record, "stage0": {"R": 10.004}}) == []
    assert differences(record, {**record, "stage0": {"R": 10.01}}) == [
        "stage-0 R is 10.00 here, 10.01 in the reference"]
    found = differences(record, {**record, "weights_sha256": {"llava": "b"},
                                 "environment": {"threads": 4}})
    assert found == ["the model weights differ", "threads 1 here, 4 in the reference"]
    assert differences(record, {**record, "world_sha256": "v"})[0] == (
        "the generated world's files differ")


def test_readme_main_path_on_the_small_preset(small_base: Path, tmp_path: Path) -> None:
    """`clbench run --method finetune --suite ucit-micro`: the suite's generator and default
    model (the small preset, from the cache), a run whose stage 0 equals the build's record."""
    env = {**os.environ, "CLBENCH_CACHE": str(small_base.parents[1]), PRESET_VARIABLE: "small",
           "PYTHONPATH": str(ROOT)}
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "cl_bench.cli", "run", "--method", "finetune", "--suite",
            "ucit-micro", "--out", str(out), "--set", "train.max_steps=2"]
    subprocess.run(argv, env=env, cwd=ROOT, check=True, capture_output=True)
    stage0 = json.loads((out / "records.jsonl").read_text().splitlines()[0])
    expected = record_of(small_base)["stage0"]
    assert {k: round(v, 2) for k, v in stage0["scores"].items()} == {
        k: round(expected[k], 2) for k in stage0["scores"]}
    assert len((out / "records.jsonl").read_text().splitlines()) == 7
