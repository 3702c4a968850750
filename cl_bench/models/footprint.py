"""What a method costs in memory as tasks accumulate (HiDe-LLaVA Figure 5's comparison).

Three numbers per stage, the same for every method, measured rather than declared:

- ``trainable_parameters``: elements the stage trains (parameters with ``requires_grad``);
- ``inference_parameters`` / ``inference_bytes``: elements and bytes of every parameter and
  buffer of the model the method evaluates (experts, prompt pools, stored updates included);
- ``kept_bytes``: the size of the tensor files of the stage's checkpoint, i.e. everything the
  method keeps beyond the starting model after learning the stage's tasks
  (cl_bench.models.checkpoint), JSON state and model cards aside.

Counting uses ``numel`` and ``element_size`` only, so it works on any device (the meta device
too) and never copies a tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cl_bench.models.checkpoint import WEIGHT_SUFFIXES


def trainable_parameters(model: torch.nn.Module) -> int:
    """Elements of the parameters that train."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def held_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of ``model``, each once (shared ones are not counted twice)."""
    seen: dict[int, torch.Tensor] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        seen.setdefault(id(tensor), tensor)
    return list(seen.values())


def inference_footprint(model: torch.nn.Module) -> dict[str, int]:
    """Elements and bytes of what ``model`` holds for inference."""
    tensors = held_tensors(model)
    return {"inference_parameters": sum(t.numel() for t in tensors),
            "inference_bytes": sum(t.numel() * t.element_size() for t in tensors)}


def tensor_file_bytes(folder: Path) -> int:
    """Total size of the weight files under ``folder`` (0 when it does not exist)."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*")
               if f.suffix in WEIGHT_SUFFIXES and f.is_file())
