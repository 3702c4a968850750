"""The micro world's base model: built once, in a child process whose numeric environment is
pinned, cached by config, and checked against the reference build whenever it is loaded.

Float results on a CPU depend on the thread count (how sums are split) and on the vector
instructions the kernels use (AVX-512 or AVX2 code of torch, MKL and oneDNN); a training run of
a few thousand steps turns such last-bit differences into a different model. The build therefore
runs with two threads and AVX2 kernels on the CPU, whatever the machine and the caller's
settings, so that the same config gives the same weights on any x86-64 machine with the same
packages. Two threads, not one: the split of every sum depends on the thread count alone, not on
the cores there are, and two threads build in 0.57x the time of one (0.215 s against 0.378 s per
instruction-tuning step on the 2-core reference machine).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

from cl_bench.errors import CLBenchError
from tasks.micro.build import BaseBuildConfig, Phase, build_base
from tasks.micro.fingerprint import (
    REFERENCE,
    differences,
    numeric_environment,
    package_versions,
    read_record,
    weights_sha256,
)
from tasks.micro.model import TinyConfig
from tasks.micro.world import MicroWorldConfig
from tasks.micro.write import generate_micro_world

FORMAT_VERSION = 4
PINNED_ENVIRONMENT = {
    "OMP_NUM_THREADS": "2",  # a fixed thread count: sums are split the same way on every machine
    "MKL_NUM_THREADS": "2",
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's own kernels: AVX2 code even on AVX-512 CPUs
    "MKL_CBWR": "AVX2",  # Intel MKL's conditional numerical reproducibility
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN's kernels
    "CUDA_VISIBLE_DEVICES": "",  # always on the CPU
    "PYTHONHASHSEED": "0",
}


PRESET_VARIABLE = "CLBENCH_MICRO_PRESET"
# The shrunken world and base of tests and smoke runs: built in well under a minute.
SMALL = BaseBuildConfig(
    tiny=TinyConfig(vision_hidden=64, vision_layers=2, projection_dim=64, text_hidden=96,
                    text_layers=2, heads=2, intermediate=256, vocab_size=800),
    world=MicroWorldConfig(n_train=96, n_test=24, n_general=800, n_inquiry=16, n_probe=8,
                           n_bench=24, n_clip=800, n_align=200, n_text=200),
    clip_steps=60, clip_batch=64, chat=Phase(40, 16), align=Phase(30, 16), tune=Phase(150, 16),
)
PRESETS = {"default": BaseBuildConfig(), "small": SMALL}


class BaseMismatchWarning(UserWarning):
    """A micro base model that is not the one its config should give."""


def build_fingerprint(build: BaseBuildConfig) -> str:
    """A short stable hash of the build config and the format version (the cache key)."""
    parts = [FORMAT_VERSION, build.world.fingerprint(), build.as_dict()]
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def preset() -> BaseBuildConfig:
    """The build named by ``CLBENCH_MICRO_PRESET`` (``default``, or ``small`` for smoke runs)."""
    name = os.environ.get(PRESET_VARIABLE, "default")
    if name not in PRESETS:
        raise CLBenchError(f"{PRESET_VARIABLE}={name!r}: expected one of {', '.join(PRESETS)}")
    return PRESETS[name]


def micro_data_root(cache: Path, world: MicroWorldConfig | None = None) -> Path:
    """The generated micro world (generated on first use, then cached)."""
    return generate_micro_world(cache / "micro-data", world or preset().world, progress=True)


def base_folder(cache: Path, build: BaseBuildConfig) -> Path:
    return cache / "micro-base" / build_fingerprint(build)


def micro_base_model(
    cache: Path, force: bool = False, build: BaseBuildConfig | None = None
) -> Path:
    """The cached base LLaVA folder (instruction-tuned), built if missing (or if ``force``)."""
    return micro_base_folder(cache, force, build) / "llava"


def micro_aligned_model(cache: Path, build: BaseBuildConfig | None = None) -> Path:
    """The base build's model after alignment only (projector trained on brief captions)."""
    return micro_base_folder(cache, build=build) / "aligned"


def micro_clip_model(cache: Path, build: BaseBuildConfig | None = None) -> Path:
    """The tiny CLIP folder of the base build (its text tower gives HiDe's text anchors)."""
    return micro_base_folder(cache, build=build) / "clip"


def micro_base_folder(
    cache: Path, force: bool = False, build: BaseBuildConfig | None = None
) -> Path:
    """The base build's folder (``clip/``, ``aligned/``, ``llava/``, ``build.json``)."""
    build = build or preset()
    folder = base_folder(cache, build)
    if (folder / "build.json").exists() and not force:
        check_base(folder)
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    data = micro_data_root(cache, build.world)
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    run_build_process(data, staging, build)
    staging.rename(folder)
    check_base(folder)
    return folder


def run_build_process(data: Path, out: Path, build: BaseBuildConfig) -> None:
    """Build in a fresh Python process under ``PINNED_ENVIRONMENT``."""
    root = Path(__file__).resolve().parents[2]
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, **PINNED_ENVIRONMENT, "PYTHONPATH": path}
    config = json.dumps(build.as_dict())
    cmd = [sys.executable, "-m", "tasks.micro.base", str(data), str(out), config]
    result = subprocess.run(cmd, env=env, cwd=root, check=False)
    if result.returncode != 0:
        raise CLBenchError(
            f"the micro base build failed (exit code {result.returncode}); its messages are "
            f"above. Nothing was cached; {out} holds what it wrote"
        )


def build_and_record(data: Path, out: Path, build: BaseBuildConfig) -> dict:
    """Build into ``out`` and write its ``build.json`` (run inside the pinned process)."""
    from tasks.micro.stage0 import stage0_scores

    seconds = build_base(data, out, build)
    started = time.time()
    manifest = json.loads((data / "manifest.json").read_text())
    record = {
        "fingerprint": build_fingerprint(build),
        "config": build.as_dict(),
        "world_sha256": manifest.get("content_sha256"),
        "versions": package_versions(),
        "environment": numeric_environment(),
        "weights_sha256": weights_sha256(out),
        "stage0": stage0_scores(out / "llava", data),
        "seconds": seconds | {"stage0": round(time.time() - started, 1)},
    }
    (out / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def check_base(folder: Path, reference: Path = REFERENCE) -> list[str]:
    """Warn (BaseMismatchWarning) when a cached base is not what its config should give: its
    weights changed since it was built, or it differs from the reference build of the same
    config (the differences are named). Returns them."""
    record = read_record(folder / "build.json")
    if record is None:
        problems = ["it has no build.json"]
    else:
        problems = []
        if weights_sha256(folder) != record.get("weights_sha256"):
            problems.append("its weights changed since it was built")
        expected = read_record(reference)
        if expected and expected.get("fingerprint") == record.get("fingerprint"):
            problems += differences(record, expected)
    if problems:
        warnings.warn(
            f"micro base model {folder} is not the reference build of its config: "
            + "; ".join(problems)
            + ". Scores will differ from those documented (rebuild with `clbench base build "
            "--force`, or install the reference's package versions)",
            BaseMismatchWarning,
            stacklevel=2,
        )
    return problems


def main(argv: list[str]) -> None:
    data, out, config = argv
    build_and_record(Path(data), Path(out), BaseBuildConfig.from_dict(json.loads(config)))


if __name__ == "__main__":
    main(sys.argv[1:])
