"""The shared fixtures do not depend on which tests ran before them, nor leave a trace."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from conftest import write_tiny_clip, write_tiny_llava


def draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def weights(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_fixture_models_ignore_and_keep_the_global_random_state(
    tiny_llava: Path, tiny_clip: Path, tmp_path: Path
) -> None:
    builds = []
    for seed in (1, 2):
        for rng in (random, np.random, torch):
            rng.seed(seed) if rng is not torch else torch.manual_seed(seed)
        expected = draws()
        for rng in (random, np.random, torch):
            rng.seed(seed) if rng is not torch else torch.manual_seed(seed)
        llava = write_tiny_llava(tmp_path / f"llava{seed}")
        clip = write_tiny_clip(tmp_path / f"clip{seed}")
        assert draws() == expected  # the global state is where it was
        builds.append((weights(llava), weights(clip)))
    assert builds[0] == builds[1] == (weights(tiny_llava), weights(tiny_clip))
    assert builds[0][0]  # the weights were compared, not two empty folders
