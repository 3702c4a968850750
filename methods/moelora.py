"""MoELoRA (CoIN): a LoRA split into experts mixed per token by a softmax router in every layer.

CoIN (Chen et al., NeurIPS 2024 Datasets & Benchmarks, section 4) turns each adapted linear
layer's rank-r LoRA into E experts of rank r/E and a router: for every token x,
``h = W x + (alpha / r) * sum_e g_e(x) B_e A_e x`` with ``g(x) = softmax(W_g x)`` over the E
experts, summed densely (every expert contributes), no task identity anywhere. One MoELoRA and
its routers train through all stages (each stage starts from the previous stage's adapter, as
the reference scripts' ``previous_task_model_path``); nothing is merged, since the mixture
depends on the token. Checked against ``MoELoRA/CoIN/peft/tuners/clitmoelora.py`` of MCITlib
(``CoINMOELoraLinear.forward``: router on the undropped input, softmax over the last dim,
scaling lora_alpha / r with r the total rank; A ~ N(0, 0.01), B = 0; the router an
``nn.Linear(in, E, bias=False)``) and ``CoIN/peft/tuners/coinmoelora.py`` of zackschen/CoIN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cl_bench.errors import CLBenchError
from cl_bench.method import Method, MethodContext, Stage
from cl_bench.models.lora import language_model_linears, set_projector_trainable
from cl_bench.models.sharing import shallow_copy
from cl_bench.registry import register_method
from tasks.suite import TaskSpec

ADAPTER_FILE = "moelora.safetensors"
RANK_PER_EXPERT = 3  # MCITlib's UCIT configs: rank 18 over 6 experts


@dataclass
class MoELoRAOptions:
    """MoELoRA. Dropout, targets and whether the projector trains come from the config's
    ``lora`` section."""

    experts: int | None = None
    """E, the experts per adapted layer (None: one per stage, as CoIN's 8 for 8 tasks and
    MCITlib's 6 for UCIT)."""
    rank: int | None = None
    """The total rank r, split into E experts of rank r/E (None: 3 per expert, MCITlib's UCIT
    r = 18)."""
    alpha: float | None = None
    """The LoRA alpha (None: 2 r, as CoIN, MCITlib and Prism)."""

    def __post_init__(self) -> None:
        check_options(self)


def check_options(o: MoELoRAOptions, experts: int | None = None) -> None:
    """Bad values, and a rank the experts do not divide, are errors before any training (when
    the options are read; with E from the run's stages, when the stages are planned)."""
    problems = []
    if o.experts is not None and o.experts < 1:
        problems.append(f"method.experts={o.experts}: must be >= 1")
    if o.rank is not None and o.rank < 1:
        problems.append(f"method.rank={o.rank}: must be >= 1")
    if o.alpha is not None and o.alpha <= 0:
        problems.append(f"method.alpha={o.alpha}: must be > 0")
    experts = experts or o.experts
    if not problems and o.rank is not None and experts and o.rank % experts:
        problems.append(f"method.rank={o.rank} is not divisible by {experts} experts: each "
                        "expert has rank r / E")
    if problems:
        raise CLBenchError("; ".join(problems))


class MoELoRALinear(torch.nn.Module):
    """``base(x) + scaling * sum_e g_e(x) B_e A_e dropout(x)``, ``g = softmax(router x)`` per
    token. A (r x in) and B (out x r) hold the experts' factors side by side (expert e: rows /
    columns e*r/E to (e+1)*r/E); adapter parameters are fp32 whatever the base's dtype."""

    def __init__(self, base: torch.nn.Linear, experts: int, rank: int, scaling: float,
                 dropout: float) -> None:
        super().__init__()
        if rank % experts:
            raise CLBenchError(f"rank {rank} is not divisible by {experts} experts")
        self.base, self.experts, self.scaling = base, experts, scaling
        device = base.weight.device
        a = torch.empty(rank, base.in_features).normal_(0.0, 0.01)  # reference init of A
        router = torch.empty(experts, base.in_features)
        torch.nn.init.kaiming_uniform_(router, a=math.sqrt(5))  # nn.Linear's init, as reference
        self.A = torch.nn.Parameter(a.to(device))
        self.B = torch.nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        self.router = torch.nn.Parameter(router.to(device))
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Each token's weights over the experts (..., E), summing to 1."""
        return torch.softmax(x.float() @ self.router.T, dim=-1)  # CoIN MoELoRA router

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        x = x.float()
        h = self.dropout(x) @ self.A.T  # every expert's A_e x, side by side (..., r)
        h = (h.unflatten(-1, (self.experts, -1)) * self.gates(x).unsqueeze(-1)).flatten(-2)
        return out + (self.scaling * h @ self.B.T).to(out.dtype)  # CoIN: sum_e g_e B_e A_e x


def moe_layers(model: torch.nn.Module) -> dict[str, MoELoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MoELoRALinear)}


@register_method(
    "moelora",
    paper="MoELoRA of CoIN (Chen et al., NeurIPS 2024 D&B); baseline in HiDe-LLaVA, LLaVA-c",
    trains="one MoE-LoRA (E experts of rank r/E + a token router per layer), trained on "
           "through all stages, + the projector if lora.train_projector",
    growth="none (E experts fixed up front; by default E = the number of tasks)",
    routes=True,
)
class MoELoRA(Method):
    """CoIN's MoELoRA: LoRA experts of rank r/E mixed per token by a softmax router."""

    Options = MoELoRAOptions

    def __init__(self, options: MoELoRAOptions, context: MethodContext) -> None:
        super().__init__(options, context)
        self.experts = options.experts

    def plan(self, tasks: list[TaskSpec]) -> list[Stage]:
        stages = super().plan(tasks)
        self.experts = self.options.experts or len(stages)
        check_options(self.options, self.experts)
        return stages

    @property
    def rank(self) -> int:
        return self.options.rank or RANK_PER_EXPERT * self.experts

    # -- training ----------------------------------------------------------------------------
    def before_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        """Wrap the targeted layers once (stage 1); train the adapters and, if configured, the
        projector."""
        if not moe_layers(model):
            self._wrap(model)
        model.requires_grad_(False)
        for layer in moe_layers(model).values():
            for p in (layer.A, layer.B, layer.router):
                p.requires_grad_(True)
        set_projector_trainable(model, self.context.config.lora.train_projector)
        return model

    def _wrap(self, model: torch.nn.Module) -> None:
        lora = self.context.config.lora
        scaling = (self.options.alpha or 2 * self.rank) / self.rank
        targets = language_model_linears(model, lora.targets)
        if not targets:
            raise CLBenchError(f"no language-model linear layers named {lora.targets} to adapt")
        for name, linear in targets.items():
            model.set_submodule(name, MoELoRALinear(linear, self.experts, self.rank, scaling,
                                                    lora.dropout))

    def after_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        """Nothing to merge: the next stage trains the same experts and routers on."""
        return model

    # -- checkpoints -------------------------------------------------------------------------
    def save(self, model: torch.nn.Module, folder: Path) -> None:
        """The plain model (each wrapped layer's base) and the adapters beside it."""
        plain = shallow_copy(model)
        layers = moe_layers(plain)
        for name, layer in layers.items():
            plain.set_submodule(name, layer.base)
        # the adapters are no parameters of the plain model: they go to ADAPTER_FILE
        self.context.trained -= {f"{n}.{part}" for n in layers for part in ("A", "B", "router")}
        super().save(plain, folder)
        tensors = {f"{name}::{part}": getattr(layer, part).detach().cpu().contiguous()
                   for name, layer in layers.items() for part in ("A", "B", "router")}
        save_file(tensors, str(folder / ADAPTER_FILE))

    def load(self, folder: Path) -> torch.nn.Module:
        model = super().load(folder)
        path = folder / ADAPTER_FILE
        if not path.is_file():
            raise CLBenchError(f"{path} is missing: a MoELoRA checkpoint keeps its adapters there")
        self._wrap(model)
        tensors = load_file(str(path))
        for name, layer in moe_layers(model).items():
            for part in ("A", "B", "router"):
                stored = tensors.get(f"{name}::{part}")
                if stored is None or stored.shape != getattr(layer, part).shape:
                    raise CLBenchError(f"{path}: no {part} of shape "
                                       f"{tuple(getattr(layer, part).shape)} for {name}")
                getattr(layer, part).data.copy_(stored)
        return model

    def state(self) -> dict:
        return {"experts": self.experts, "rank": self.rank}
