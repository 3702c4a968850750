"""Mixtures of LoRA experts inside a linear layer, and their checkpoints.

An ``ExpertLoRALinear`` wraps a linear layer of the language model with E LoRA experts of rank
r/E each. A (r x in) and B (out x r) hold the experts' factors side by side (expert e: rows,
resp. columns, e r/E to (e+1) r/E); they and every other adapter tensor are fp32 on the base's
device, whatever the base's dtype, and the output is cast back to the base's dtype. Subclasses
decide how the experts are weighted (MoELoRA's token router, which CL-MoE extends).

A model's expert layers are saved apart from the plain model (``save_expert_layers``): their
state (parameters and persistent buffers), without the base weights, by module name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cl_bench.errors import CLBenchError
from cl_bench.models.lora import language_model_linears
from cl_bench.models.sharing import shallow_copy
from cl_bench.models.updates import linear_float32

BASE = "base."


class ExpertLoRALinear(torch.nn.Module):
    """``base(x)`` plus E LoRA experts of rank r/E (A ~ N(0, 0.01), B = 0, as CoIN's MoELoRA);
    subclasses implement ``forward`` with ``expert_inputs`` and ``expert_outputs``."""

    saved_by_method = True  # by save_expert_layers, not in the model state of a checkpoint

    def __init__(self, base: torch.nn.Linear, experts: int, rank: int, scaling: float,
                 dropout: float) -> None:
        super().__init__()
        if experts < 1 or rank % experts:
            raise CLBenchError(f"rank {rank} is not divisible by {experts} experts")
        self.base, self.experts, self.scaling = base, experts, scaling
        device = base.weight.device
        a = torch.empty(rank, base.in_features).normal_(0.0, 0.01)  # CoIN / MCITlib init of A
        self.A = torch.nn.Parameter(a.to(device))
        self.B = torch.nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()

    @property
    def expert_rank(self) -> int:
        return self.A.shape[0] // self.experts

    def expert_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert's ``A_e dropout(x)`` (..., E, r/E), in fp32."""
        return (self.dropout(x.float()) @ self.A.T).unflatten(-1, (self.experts, -1))

    def expert_outputs(self, h: torch.Tensor) -> torch.Tensor:
        """``scaling * sum_e B_e h_e`` (..., out) of per-expert inputs h (..., E, r/E)."""
        return self.scaling * h.flatten(-2) @ self.B.T

    def adapter_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters that train (all but the base's)."""
        return [p for name, p in self.named_parameters() if not name.startswith(BASE)]


def new_router(experts: int, features: int, device: torch.device) -> torch.nn.Parameter:
    """A bias-free linear router (E x features) with ``nn.Linear``'s default init."""
    weight = torch.empty(experts, features)
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return torch.nn.Parameter(weight.to(device))


class MoELoRALinear(ExpertLoRALinear):
    """``base(x) + scaling * sum_e g_e(x) B_e A_e dropout(x)``, ``g = softmax(router x)`` per
    token (CoIN's MoELoRA)."""

    def __init__(self, base: torch.nn.Linear, experts: int, rank: int, scaling: float,
                 dropout: float) -> None:
        super().__init__(base, experts, rank, scaling, dropout)
        self.router = new_router(experts, base.in_features, base.weight.device)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Each token's weights over the experts (..., E), summing to 1."""
        return torch.softmax(x.float() @ self.router.T, dim=-1)  # CoIN MoELoRA router

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base and experts summed in float32 and rounded once to the base's dtype (added to
        an already rounded low-precision output, a small update would round away)."""
        out = linear_float32(self.base, x)
        h = self.expert_inputs(x) * self.gates(x).unsqueeze(-1)  # CoIN: g_e(x) A_e x
        out = out + self.expert_outputs(h)  # CoIN: sum_e g_e B_e A_e x
        return out.to(self.base.weight.dtype)


class SampleInputs:
    """What expert routers read besides the layer input, shared by every expert layer of one
    model: a per-sample tensor (B x D, e.g. an instruction embedding or a routing prior, set
    before each batch by the method's hooks) and the batch's attention mask (kept by
    ``keep_attention_mask``)."""

    def __init__(self) -> None:
        self.features: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None

    def features_for(self, rows: int) -> torch.Tensor:
        """The per-sample tensor for a layer input of ``rows`` rows (beams repeat a sample)."""
        f = self.features
        if f is None:
            raise CLBenchError("the experts' per-sample inputs are not set: training and "
                               "generation must call the method's before_train_batch / "
                               "before_generate")
        if rows != f.shape[0]:
            if rows % f.shape[0]:
                raise CLBenchError(f"{rows} rows, per-sample expert inputs for {f.shape[0]}")
            f = f.repeat_interleave(rows // f.shape[0], dim=0)
        return f

    def mask_for(self, x: torch.Tensor) -> torch.Tensor | None:
        m = self.mask
        if m is None or m.shape[0] == x.shape[0]:
            return m
        return m.repeat_interleave(x.shape[0] // m.shape[0], dim=0)


def keep_attention_mask(model: torch.nn.Module, inputs: SampleInputs) -> None:
    """Keep each forward's ``attention_mask`` in ``inputs`` (a pre-hook on ``model``)."""

    def keep(module, args, kwargs) -> None:
        inputs.mask = kwargs.get("attention_mask")

    model.register_forward_pre_hook(keep, with_kwargs=True)


def sequence_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Each sample's mean over its sequence (B, ...) of x (B, n, ...), over the attended
    positions when the batch's mask covers them; a decoding step (n = 1) is its own mean."""
    if mask is None or x.shape[1] == 1:
        return x.mean(1)
    if mask.shape != x.shape[:2]:
        raise CLBenchError(f"attention mask of shape {tuple(mask.shape)} for a layer input of "
                           f"{tuple(x.shape[:2])} positions")
    weights = mask.to(x.device, x.dtype).view(*mask.shape, *([1] * (x.ndim - 2)))
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def wrap_linears(
    model: torch.nn.Module, targets: list[str],
    make: Callable[[str, torch.nn.Linear], ExpertLoRALinear],
) -> dict[str, ExpertLoRALinear]:
    """Replace the language model's linear layers named in ``targets`` by ``make(name, linear)``
    in place; returns the new layers by name."""
    linears = language_model_linears(model, targets)
    if not linears:
        raise CLBenchError(f"no language-model linear layers named {targets} to adapt")
    layers = {}
    for name, linear in linears.items():
        layers[name] = make(name, linear)
        model.set_submodule(name, layers[name])
    return layers


def expert_layers(model: torch.nn.Module) -> dict[str, ExpertLoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ExpertLoRALinear)}


def without_experts(model: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of ``model`` with every expert layer replaced by its base linear."""
    plain = shallow_copy(model)
    for name, layer in expert_layers(plain).items():
        plain.set_submodule(name, layer.base)
    return plain


def save_expert_layers(model: torch.nn.Module, path: Path) -> None:
    """Every expert layer's state without its base weights, as ``<module>::<key>`` tensors."""
    tensors = {f"{name}::{key}": value.detach().cpu().contiguous()
               for name, layer in expert_layers(model).items()
               for key, value in layer.state_dict().items() if not key.startswith(BASE)}
    save_file(tensors, str(path))


@torch.no_grad()
def load_expert_layers(model: torch.nn.Module, path: Path) -> None:
    """Load what ``save_expert_layers`` wrote into ``model``'s (already wrapped) expert layers;
    every tensor must be there with its shape."""
    if not path.is_file():
        raise CLBenchError(f"{path} is missing: the checkpoint keeps its expert adapters there")
    tensors = load_file(str(path))
    for name, layer in expert_layers(model).items():
        for key, value in layer.state_dict().items():
            if key.startswith(BASE):
                continue
            stored = tensors.get(f"{name}::{key}")
            if stored is None or stored.shape != value.shape:
                raise CLBenchError(f"{path}: no {key} of shape {tuple(value.shape)} for {name}")
            value.copy_(stored)
