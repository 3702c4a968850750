"""A stage's raw weight update (LoRA factors and full deltas), stored and re-applied.

A stage trains a LoRA on the language model plus, optionally, full parameters (the projector).
Its update is kept as LoRA factors where it was a LoRA, so that consolidation and later alpha
sweeps never need the M x N product. Stored on the CPU; ``cl_bench.models.updates.apply_delta``
moves what it applies to the model's device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cl_bench.errors import CLBenchError

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraFactors:
    """delta W = scaling * B @ A, with B: out x q and A: q x in."""

    B: torch.Tensor
    A: torch.Tensor
    scaling: float

    def product(self) -> torch.Tensor:
        return self.scaling * (self.B.float() @ self.A.float())


@dataclass
class StageDelta:
    """The update of one stage: LoRA factors by module name, full deltas by parameter name."""

    lora: dict[str, LoraFactors] = field(default_factory=dict)
    full: dict[str, torch.Tensor] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        tensors, meta = {}, {}
        for name, f in self.lora.items():
            tensors[f"lora::{name}::A"], tensors[f"lora::{name}::B"] = f.A, f.B
            meta[name] = repr(f.scaling)
        tensors |= {f"full::{name}": t for name, t in self.full.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path),
                  metadata=meta)

    @classmethod
    def load(cls, path: Path) -> StageDelta:
        if not path.exists():
            raise CLBenchError(f"no stored delta at {path}")
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        delta = cls()
        for key, tensor in tensors.items():
            kind, name, *part = key.split("::")
            if kind == "full":
                delta.full[name] = tensor
            elif part == ["A"]:
                B = tensors[f"lora::{name}::B"]
                delta.lora[name] = LoraFactors(B, tensor, float(meta[name]))
        return delta


def save_lora_file(
    path: Path,
    lora: dict[str, LoraFactors],
    tensors: dict[str, torch.Tensor] | None = None,
    meta: dict[str, str] | None = None,
) -> Path:
    """LoRA factors by module name, other named tensors and string metadata in one safetensors
    file (a stored expert of a method that keeps one LoRA per task); tensors go to the CPU."""
    meta = dict(meta or {})
    if "scalings" in meta or any(k.startswith("lora::") for k in tensors or {}):
        raise CLBenchError("'scalings' and 'lora::' names are reserved in a LoRA file")
    stored = {k: t for k, t in (tensors or {}).items()}
    for name, f in lora.items():
        stored[f"lora::{name}::A"], stored[f"lora::{name}::B"] = f.A, f.B
    meta["scalings"] = json.dumps({name: f.scaling for name, f in lora.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in stored.items()}, str(path), meta)
    return path


def load_lora_file(
    path: Path,
) -> tuple[dict[str, LoraFactors], dict[str, torch.Tensor], dict[str, str]]:
    """What ``save_lora_file`` wrote: (LoRA factors, other tensors, metadata)."""
    from safetensors import safe_open

    if not path.is_file():
        raise CLBenchError(f"stored LoRA file {path} is missing")
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    if "scalings" not in meta:
        raise CLBenchError(f"{path} is not a stored LoRA file (no 'scalings' metadata)")
    scalings = json.loads(meta.pop("scalings"))
    lora = {
        name: LoraFactors(tensors.pop(f"lora::{name}::B"), tensors.pop(f"lora::{name}::A"), s)
        for name, s in scalings.items()
    }
    return lora, tensors, meta


def delta_path(run_dir: Path, stage: int) -> Path:
    """Where a method that stores its raw stage updates keeps stage ``stage``'s."""
    return run_dir / "deltas" / f"stage_{stage}.safetensors"


def load_stage_delta(run_dir: Path, stage: int) -> StageDelta:
    """The raw update stored for ``stage`` in a run folder."""
    path = delta_path(run_dir, stage)
    if not path.exists():
        raise CLBenchError(
            f"{run_dir}: no stored delta for stage {stage} ({path.name}); only methods that "
            "consolidate stored updates (llava_c, modelmix and their ablations) store them"
        )
    return StageDelta.load(path)


def strip_prefix(name: str) -> str:
    return name.removeprefix(PEFT_PREFIX)


def snapshot_trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable parameters that are not LoRA factors (e.g. the projector)."""
    return {
        strip_prefix(name): p.detach().clone()
        for name, p in model.named_parameters()
        if p.requires_grad and "lora_" not in name
    }


def stage_delta(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> StageDelta:
    """The update of a PEFT model trained from ``before`` (active adapter's factors)."""
    delta = StageDelta()
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and module.active_adapters:
            adapter = module.active_adapters[0]
            if adapter in module.lora_A:
                delta.lora[strip_prefix(name)] = LoraFactors(
                    module.lora_B[adapter].weight.detach().clone(),
                    module.lora_A[adapter].weight.detach().clone(),
                    float(module.scaling[adapter]),
                )
    params = {strip_prefix(n): p for n, p in model.named_parameters()}
    delta.full = {name: params[name].detach() - old for name, old in before.items()}
    return delta
