"""Helpers for method tests: a method's context on the tiny fixtures, stand-in training, and
end-to-end runs (a quick run, and the same run killed during stage 2 and resumed, which must
give the same matrix and predictions; a learning rate high enough for two steps to change the
answers makes a lost method state visible)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cl_bench.running.runner
from cl_bench.cli import main
from cl_bench.config import RunConfig
from cl_bench.method import MethodContext, Stage
from cl_bench.models.llava import load_llava
from cl_bench.registry import get_suite

RANK = 2


def make_context(method: str, tiny_llava: Path, ucit_root: Path, run_dir: Path) -> MethodContext:
    """A method's context on the tiny LLaVA and the UCIT-layout fixture, LoRA rank 2."""
    cfg = RunConfig(method=method, suite="ucit", seed=0)
    cfg.lora.rank, cfg.lora.alpha = RANK, 4.0
    return MethodContext(cfg, get_suite("ucit"), ucit_root, load_llava(tiny_llava), run_dir)


def trained_like(model: torch.nn.Module, seed: int) -> None:
    """Stand-in for training: random non-zero LoRA B factors and a nudged projector."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                scale = 0.5 if "lora_B" in name else 0.01
                p.add_(scale * torch.randn(p.shape, generator=gen))


def stage(index: int, name: str) -> Stage:
    """Stage ``index`` training on the UCIT task ``name``."""
    return Stage(index, (get_suite("ucit").task(name),))


def quick_argv(method: str, ucit_root: Path, tiny_llava: Path, out: Path, *sets: str) -> list[str]:
    argv = ["run", "--method", method, "--suite", "ucit", "--data-root", str(ucit_root),
            "--model", str(tiny_llava), "--quick", "--order", "RA", "--out", str(out),
            "--set", "eval.max_new_tokens=4", "--set", "train.max_steps=2",
            "--set", "train.learning_rate=0.01"]
    for value in sets:
        argv += ["--set", value]
    return argv


def run_and_resume(
    method: str, ucit_root: Path, tiny_llava: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, *sets: str,
) -> Path:
    """A quick two-stage run, then the same run killed at stage 2 and resumed; the two give the
    same matrix, predictions and routing counts. Returns the uninterrupted run's folder."""
    full = tmp_path / "full"
    assert main(quick_argv(method, ucit_root, tiny_llava, full, *sets)) == 0
    real_stage = cl_bench.running.runner.run_stage

    def crash_at_stage_2(method_, model, stage, *args, **kwargs):
        if stage.index == 2:
            raise KeyboardInterrupt("killed")
        return real_stage(method_, model, stage, *args, **kwargs)

    crashed = tmp_path / "crashed"
    monkeypatch.setattr(cl_bench.running.runner, "run_stage", crash_at_stage_2)
    with pytest.raises(KeyboardInterrupt):
        main(quick_argv(method, ucit_root, tiny_llava, crashed, *sets))
    monkeypatch.setattr(cl_bench.running.runner, "run_stage", real_stage)
    assert main(["run", "--out", str(crashed), "--resume"]) == 0
    for name in ("matrix.csv", *sorted(str(f.relative_to(full)) for f in full.rglob("*")
                                      if f.parent.name in ("stage_2", "routing") and f.is_file()
                                      and "checkpoints" not in f.parts)):
        assert (crashed / name).read_bytes() == (full / name).read_bytes(), name
    return full
