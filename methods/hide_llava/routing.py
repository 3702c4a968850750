"""HiDe-LLaVA routing (eq. 3-5): per-sample weights over the tasks from anchor similarities,
and the top layer's LoRA branch mixed by them."""

from __future__ import annotations

import itertools

import torch

from cl_bench.errors import CLBenchError
from cl_bench.models.deltas import LoraFactors
from cl_bench.models.updates import linear_float32


# -- routing: HiDe-LLaVA eq. 3-5 ----------------------------------------------------------------
def anchor_similarity(features: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each sample (B x D) to each task anchor (C x D): B x C."""
    anchors = anchors.to(features.device, torch.float32)
    return torch.nn.functional.cosine_similarity(  # HiDe-LLaVA eq. 3
        features.float().unsqueeze(1), anchors.unsqueeze(0), dim=-1
    )


def routing_weights(
    image_sims: torch.Tensor | None,
    text_sims: torch.Tensor,
    has_image: torch.Tensor,
    image_weight: float,
    text_weight: float,
    temperature: float,
) -> torch.Tensor:
    """Per-sample weights d (B x C) over the learned tasks.

    Samples without an image (or when no image similarity is given) route on text alone.
    """
    text_only = text_sims
    if image_sims is None:
        combined = text_only
    else:
        both = image_weight * image_sims + text_weight * text_sims  # HiDe-LLaVA eq. 4, r-bar
        combined = torch.where(has_image.unsqueeze(1), both, text_only)
    return torch.softmax(combined / temperature, dim=-1)  # HiDe-LLaVA eq. 4, d_c



class Routing:
    """Per-sample routing weights shared by every routed module of one assembled model."""

    def __init__(self) -> None:
        self.weights: torch.Tensor | None = None

    def for_rows(self, rows: int) -> torch.Tensor:
        d = self.weights
        if d is None:
            raise CLBenchError(
                "HiDe-LLaVA routing weights are not set: generation must go through "
                "cl_bench.evaluation.generation.generate_answers with the method's "
                "before_generate hook"
            )
        if rows != d.shape[0]:
            if rows % d.shape[0]:
                raise CLBenchError(f"batch of {rows} rows, routing weights for {d.shape[0]}")
            d = d.repeat_interleave(rows // d.shape[0], dim=0)
        return d


class RoutedLoRALinear(torch.nn.Module):
    """base(x) + sum_c d_c * s_c * B_c A_c x, with per-sample weights d (HiDe-LLaVA eq. 5).
    The factors stay float32 on the base's device; base and branches are summed in float32."""

    def __init__(self, base: torch.nn.Linear, experts: list[LoraFactors], routing: Routing) -> None:
        super().__init__()
        self.base, self.routing = base, routing
        device = base.weight.device
        self.A = torch.nn.ParameterList(
            [torch.nn.Parameter(f.A.to(device, torch.float32), requires_grad=False)
             for f in experts]
        )
        self.B = torch.nn.ParameterList(
            [torch.nn.Parameter((f.scaling * f.B.to(device, torch.float32)),
                                requires_grad=False) for f in experts]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = linear_float32(self.base, x)  # rounded once, with the branches
        d = self.routing.for_rows(x.shape[0]).float()
        shape = (x.shape[0], *([1] * (x.ndim - 1)))
        xf = x.float()
        for c, (A, B) in enumerate(zip(self.A, self.B, strict=True)):
            total = total + d[:, c].view(shape) * ((xf @ A.T) @ B.T)  # HiDe-LLaVA eq. 5
        return total.to(self.base.weight.dtype)

    def lora_parameters(self) -> int:
        return sum(p.numel() for p in itertools.chain(self.A, self.B))
