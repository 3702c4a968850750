"""The inputs' Hessians (2/n sum x x^T over non-padding tokens) of one decoder layer's adapted
linear layers, from calibration batches of the task's training data; the forward pass stops
after that layer, so the layers below it are already tailored (as the reference propagates its
calibration inputs through the tailored layers)."""

from __future__ import annotations

import contextlib
import random

import torch

from cl_bench.errors import CLBenchError
from cl_bench.models.batching import ConversationDataset, collate_batch
from cl_bench.models.llava import ModelBundle
from tasks.loaders import Sample


class _LayerDone(Exception):
    """Raised after the calibrated layer: nothing above it is needed."""


def calibration_batches(
    bundle: ModelBundle, samples: list[Sample], count: int, batch_size: int, max_length: int,
    seed: int,
) -> list[dict]:
    """``count`` training conversations (a seeded choice), collated without labels."""
    chosen = random.Random(seed).sample(samples, min(count, len(samples)))
    data = ConversationDataset(chosen, bundle, max_length)
    batches = []
    for start in range(0, len(data), batch_size):
        batch = collate_batch([data[i] for i in range(start, min(start + batch_size, len(data)))],
                              bundle)
        batch.pop("labels", None)
        batches.append(batch)
    return batches


@torch.no_grad()
def layer_hessians(
    model: torch.nn.Module, layer: torch.nn.Module, targets: dict[str, torch.nn.Module],
    batches: list[dict],
) -> dict[str, torch.Tensor]:
    """H = 2/n sum x x^T of each target's input over the batches' non-padding tokens (fp32, on
    the target's device)."""
    sums: dict[str, torch.Tensor] = {}
    mask: dict[str, torch.Tensor] = {}
    tokens = 0

    def accumulate(name: str):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            x = args[0]
            if x.shape[:2] != mask["m"].shape:
                raise CLBenchError(f"{name}: input {tuple(x.shape)} does not match the attention "
                                   f"mask {tuple(mask['m'].shape)}")
            rows = x[mask["m"].to(x.device).bool()].float()
            sums[name] = sums.get(name, 0) + rows.T @ rows
        return hook

    def stop(module: torch.nn.Module, args: tuple, output: object) -> None:
        raise _LayerDone

    handles = [t.register_forward_pre_hook(accumulate(n)) for n, t in targets.items()]
    handles.append(layer.register_forward_hook(stop))
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    try:
        for batch in batches:
            mask["m"] = batch["attention_mask"]
            inputs = {k: v.to(device, dtype) if k == "pixel_values" else v.to(device)
                      for k, v in batch.items()}
            with contextlib.suppress(_LayerDone):
                model(**inputs)
            tokens += int(batch["attention_mask"].sum())
    finally:
        for handle in handles:
            handle.remove()
    return {name: 2 * H / tokens for name, H in sums.items()}
