"""Consolidated updates beside the frozen weights, so that no stage's update is lost to rounding.

A run never rewrites the base model's low-precision weights. What a stage leaves in a linear
layer (its LoRA, merged or consolidated) is added to that layer as float32 low-rank factors:

- weights in bfloat16 or float16: the factors stay beside the frozen weight and the layer
  computes ``W x + b + B (A x)`` accumulated in float32 and rounded once. Merging them would
  round most of the update away: bfloat16 keeps 8 significant bits, so an element of W moves
  only where its update exceeds half a rounding step (2^-9 |W|); at |dW|/|W| of 1e-3 to 1e-4,
  where LLaVA-c's SAC and ModelMix at alpha 0.2 land, most of dW is lost. Adding the update to
  the already rounded bfloat16 output would lose it the same way, hence the single rounding
  (on CUDA ``torch.mm(..., out_dtype=float32)``: bfloat16 inputs, float32 accumulator kept).
- weights in float32: the factors' product is added to the weight (float32 keeps such an update
  to ~1e-7 relative precision) and the factors are kept for the checkpoint, which replays them in
  order, giving bit-identical weights.

Cost in bfloat16 at LLaVA-1.5-7B with a rank-128 LoRA on the 7 linear layers of 32 decoder
layers: 2.5 M (rows + columns) x 128 x 4 bytes = 1.28 GB of float32 factors per stage, and the
extra matmuls of a rank-128 LoRA per stage (about 1.6 % of a forward's FLOPs each). Export
(``merged_state``) merges everything in float32 once.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cl_bench.errors import CLBenchError
from cl_bench.models.deltas import LoraFactors, StageDelta
from cl_bench.models.placement import is_low_precision

Update = LoraFactors | torch.Tensor


def float32_linear(x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + b`` accumulated and returned in float32, so that what is added to it is
    rounded once with it. Low-precision weights are never copied to float32 on CUDA."""
    if x.is_cuda and is_low_precision(weight.dtype):
        try:
            flat = torch.mm(x.reshape(-1, x.shape[-1]).to(weight.dtype), weight.T,
                            out_dtype=torch.float32)
            out = flat.view(*x.shape[:-1], weight.shape[0])
            return out if bias is None else out + bias.float()
        except (TypeError, RuntimeError):  # a torch without mm(..., out_dtype=)
            pass
    with torch.autocast("cpu", enabled=False):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float())


def linear_float32(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A linear layer's output before its final rounding (its updates included)."""
    if isinstance(module, UpdatedLinear):
        return module.forward_float32(x)
    return float32_linear(x, module.weight, module.bias)


class UpdatedLinear(torch.nn.Linear):
    """A linear layer with the consolidated updates of past stages. Shares weight and bias with
    the layer it replaces. Low-precision weights: float32 factors ``update_B`` (out x R) and
    ``update_A`` (R x in), R the sum of the stages' ranks, applied beside the weight, and a
    float32 dense remainder for updates given as full matrices. Float32 weights: each update is
    merged, and kept as given (``history``) for the checkpoint."""

    def __init__(self, base: torch.nn.Linear) -> None:
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        device = base.weight.device
        self.register_buffer("update_B", torch.zeros(self.out_features, 0, device=device),
                             persistent=False)
        self.register_buffer("update_A", torch.zeros(0, self.in_features, device=device),
                             persistent=False)
        self.register_buffer("update_dense", None, persistent=False)
        self.ranks: list[int] = []  # one entry per stage (0 for a dense update)
        self.merged = not is_low_precision(base.weight.dtype)
        self.history: list[Update] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.ranks:
            return super().forward(x)
        return self.forward_float32(x).to(self.weight.dtype)

    def forward_float32(self, x: torch.Tensor) -> torch.Tensor:
        """``W x + b`` and every update beside the weight, accumulated in float32."""
        out = float32_linear(x, self.weight, self.bias)
        if self.merged or not self.ranks:
            return out
        xf = x.float()
        out = out + (xf @ self.update_A.T) @ self.update_B.T
        if self.update_dense is not None:
            out = out + F.linear(xf, self.update_dense)
        return out

    @torch.no_grad()
    def add(self, update: Update) -> None:
        """Add one stage's update (LoRA-style factors, or a full out x in matrix)."""
        device = self.weight.device
        if isinstance(update, LoraFactors):
            update = LoraFactors(update.B.to(device), update.A.to(device), update.scaling)
            rank = update.A.shape[0]
        else:
            update = update.to(device)
            if update.shape != self.weight.shape:
                raise CLBenchError(f"update of shape {tuple(update.shape)} for a weight of "
                                   f"{tuple(self.weight.shape)}")
            rank = 0
        self.ranks.append(rank)
        if self.merged:
            full = update.product() if rank else update
            self.weight += full.to(self.weight.dtype)
            self.history.append(update)
        elif rank:
            self.update_B = torch.cat([self.update_B, update.scaling * update.B.float()], dim=1)
            self.update_A = torch.cat([self.update_A, update.A.float()], dim=0)
        else:
            dense = update.float()
            self.update_dense = dense if self.update_dense is None else self.update_dense + dense

    @torch.no_grad()
    def truncate(self, stages: int, weight: torch.Tensor | None = None) -> None:
        """Keep only the first ``stages`` updates; a merged layer gets ``weight`` (its value
        after them) back, since subtracting an update is not exact."""
        if self.merged:
            if weight is None:
                raise CLBenchError("a merged layer needs its earlier weight to drop updates")
            self.weight.copy_(weight)
            self.history = self.history[:stages]
        else:
            if 0 in self.ranks[stages:]:
                raise CLBenchError("a dense update beside the weight cannot be dropped")
            keep = sum(self.ranks[:stages])
            self.update_B, self.update_A = self.update_B[:, :keep], self.update_A[:keep]
        self.ranks = self.ranks[:stages]

    def delta(self) -> torch.Tensor:
        """The float32 sum of every update beside the weight (export and tests)."""
        total = self.update_B @ self.update_A
        return total if self.update_dense is None else total + self.update_dense

    def stage_updates(self) -> list[Update]:
        """Each stage's update, in order, as :meth:`add` replays it exactly. Beside the weight,
        the dense remainder is one sum and comes back at the first dense stage."""
        if self.merged:
            return list(self.history)
        updates: list[Update] = []
        start, dense_done = 0, False
        for rank in self.ranks:
            if rank:
                updates.append(LoraFactors(self.update_B[:, start:start + rank],
                                           self.update_A[start:start + rank], 1.0))
                start += rank
            elif not dense_done:
                updates.append(self.update_dense)
                dense_done = True
        return updates

    def extra_repr(self) -> str:
        mode = "merged into the weight" if self.merged else "float32 factors beside the weight"
        return f"{super().extra_repr()}, updates: rank {sum(self.ranks)}, {mode}"


def updatable(model: torch.nn.Module, name: str) -> UpdatedLinear:
    """The linear layer ``name`` of a plain model, made an UpdatedLinear if it is not one."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise CLBenchError(f"update for module {name!r}, absent from the model") from None
    if isinstance(module, UpdatedLinear):
        return module
    if type(module) is not torch.nn.Linear:
        raise CLBenchError(f"update for {name!r}, a {type(module).__name__}, not a linear layer")
    updated = UpdatedLinear(module)
    model.set_submodule(name, updated)
    return updated


def add_update(model: torch.nn.Module, name: str, update: Update) -> None:
    """Add one stage's update of linear layer ``name`` (see the module docstring)."""
    updatable(model, name).add(update)


Consolidate = Callable[[Update], Update]


@torch.no_grad()
def apply_delta(
    model: torch.nn.Module,
    delta: StageDelta,
    consolidate: Consolidate,
    base: dict[str, torch.Tensor] | None = None,
) -> None:
    """Add each consolidated update of a stored stage to a plain model.

    LoRA updates become the layers' consolidated updates; full parameters (the projector,
    float32) are set to ``base[name] + consolidate(delta)`` when ``base`` is given (the model
    still holds the trained values), else the update is added in place. A full update into a
    low-precision parameter is refused: it would be rounded away.
    """
    for name, factors in delta.lora.items():
        add_update(model, name, consolidate(factors))
    params = dict(model.named_parameters())
    for name, update in delta.full.items():
        if name not in params:
            raise CLBenchError(f"stored delta names parameter {name!r}, absent from the model")
        param = params[name]
        if is_low_precision(param.dtype):
            raise CLBenchError(f"a full update of {name} ({param.dtype}) would be rounded away: "
                               "parameters that train must be float32 (placement.keep_float32)")
        start = base[name] if base is not None else param.detach().clone()
        param.copy_(start.to(param.device) + consolidate(update).to(param.device, param.dtype))


def updated_layers(model: torch.nn.Module) -> dict[str, UpdatedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, UpdatedLinear)}


# -- checkpoints and export ---------------------------------------------------------------------
def updates_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every layer's updates, stage by stage, as CPU tensors, with their metadata."""
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, list[float | None]] = {}
    for name, layer in updated_layers(model).items():
        layout[name] = []
        for stage, update in enumerate(layer.stage_updates()):
            if isinstance(update, LoraFactors):
                tensors[f"update::{name}::{stage}::B"] = update.B
                tensors[f"update::{name}::{stage}::A"] = update.A
                layout[name].append(update.scaling)
            else:
                tensors[f"update::{name}::{stage}::dense"] = update
                layout[name].append(None)
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return cpu, {"updates": json.dumps(layout)}


def load_updates_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor],
                       metadata: dict[str, str]) -> None:
    """Replay saved updates onto the starting model in their stage order (bit-identical)."""
    for name, scalings in json.loads(metadata.get("updates", "{}")).items():
        layer = updatable(model, name)
        for stage, scaling in enumerate(scalings):
            key = f"update::{name}::{stage}"
            layer.add(tensors[f"{key}::dense"] if scaling is None else
                      LoraFactors(tensors[f"{key}::B"], tensors[f"{key}::A"], scaling))


def merged_state(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's state dict with every update merged in float32, then cast to ``dtype``
    (export: a plain model folder anyone can load)."""
    layers = updated_layers(model)
    state = {}
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if module in layers and leaf == "weight" and not layers[module].merged:
            value = value.float() + layers[module].delta().to(value.device)
        state[key] = value.to(dtype) if value.is_floating_point() else value
    return state
