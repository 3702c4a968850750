"""Per-sample mixtures of stored LoRA experts (and of whole modules, such as one projector per
expert), for methods that route at evaluation.

A method that keeps one LoRA per task (HiDe-LLaVA, DISCO, MR-LoRA) assembles its evaluation
model by replacing each adapted linear layer of a shallow copy of the plain model with a
``RoutedLoRALinear``: ``base(x) + sum_c d_c * s_c * B_c A_c x``, where the per-sample weights
``d`` (one row per sample of the batch) are set on a shared ``Routing`` before each generation
batch (``Method.before_generate``). The copy shares every base weight with the plain model.
"""

from __future__ import annotations

import itertools

import torch

from cl_bench.errors import CLBenchError
from cl_bench.models.deltas import LoraFactors
from cl_bench.models.sharing import shallow_copy
from cl_bench.models.updates import linear_float32


def anchor_similarity(features: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each sample's feature (B x D) to each anchor (C x D): B x C."""
    anchors = anchors.to(features.device, torch.float32)
    return torch.nn.functional.cosine_similarity(
        features.float().unsqueeze(1), anchors.unsqueeze(0), dim=-1
    )


class Routing:
    """Per-sample routing weights (B x C) shared by every routed module of one model."""

    def __init__(self) -> None:
        self.weights: torch.Tensor | None = None

    def for_rows(self, rows: int) -> torch.Tensor:
        """The weights for a module input of ``rows`` rows (beams repeat each sample)."""
        d = self.weights
        if d is None:
            raise CLBenchError(
                "routing weights are not set: generation must go through "
                "cl_bench.evaluation.generation.generate_answers with the method's "
                "before_generate hook"
            )
        if rows != d.shape[0]:
            if rows % d.shape[0]:
                raise CLBenchError(f"batch of {rows} rows, routing weights for {d.shape[0]}")
            d = d.repeat_interleave(rows // d.shape[0], dim=0)
        return d


class RoutedLoRALinear(torch.nn.Module):
    """base(x) + sum_c d_c * s_c * B_c A_c x, with per-sample weights d from ``routing``. The
    factors stay float32 on the base's device; base and branches are summed in float32 and
    rounded once to the base's dtype."""

    def __init__(self, base: torch.nn.Linear, experts: list[LoraFactors], routing: Routing) -> None:
        super().__init__()
        self.base, self.routing = base, routing
        device = base.weight.device
        self.A = torch.nn.ParameterList(
            [torch.nn.Parameter(f.A.to(device, torch.float32), requires_grad=False)
             for f in experts]
        )
        self.B = torch.nn.ParameterList(
            [torch.nn.Parameter(f.scaling * f.B.to(device, torch.float32), requires_grad=False)
             for f in experts]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = linear_float32(self.base, x)
        d = self.routing.for_rows(x.shape[0]).float()
        shape = (x.shape[0], *([1] * (x.ndim - 1)))
        xf = x.float()
        for c, (A, B) in enumerate(zip(self.A, self.B, strict=True)):
            total = total + d[:, c].view(shape) * ((xf @ A.T) @ B.T)
        return total.to(self.base.weight.dtype)

    def lora_parameters(self) -> int:
        return sum(p.numel() for p in itertools.chain(self.A, self.B))


class RoutedModule(torch.nn.Module):
    """sum_c d_c * expert_c(x) over whole modules (e.g. one projector per expert), with one
    routing row per input row (for a projector: per image)."""

    def __init__(self, experts: list[torch.nn.Module], routing: Routing) -> None:
        super().__init__()
        self.experts, self.routing = torch.nn.ModuleList(experts), routing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.routing.for_rows(x.shape[0])
        shape = (x.shape[0], *([1] * (x.ndim - 1)))
        return sum(d[:, c].to(x.dtype).view(shape) * expert(x)
                   for c, expert in enumerate(self.experts))


def route_modules(
    model: torch.nn.Module, experts: list[dict[str, LoraFactors]], routing: Routing
) -> tuple[torch.nn.Module, int]:
    """A shallow copy of ``model`` whose modules named in the experts' factors are routed over
    every expert; returns it and the LoRA parameters it holds. ``model`` is not changed."""
    names = list(experts[0])
    for i, expert in enumerate(experts[1:], start=2):
        if set(expert) != set(names):
            raise CLBenchError(
                f"expert {i} has LoRA on other modules than expert 1: routing needs the same "
                "LoRA targets in every expert"
            )
    routed = shallow_copy(model)
    parameters = 0
    for name in names:
        module = RoutedLoRALinear(routed.get_submodule(name), [e[name] for e in experts], routing)
        parameters += module.lora_parameters()
        routed.set_submodule(name, module)
    return routed, parameters
