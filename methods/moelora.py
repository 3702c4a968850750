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

from dataclasses import dataclass
from pathlib import Path

import torch

from cl_bench.errors import CLBenchError
from cl_bench.method import Method, MethodContext, Stage
from cl_bench.models.lora import set_projector_trainable
from cl_bench.models.moe_lora import (
    ExpertLoRALinear,
    MoELoRALinear,
    expert_layers,
    load_expert_layers,
    save_expert_layers,
    without_experts,
    wrap_linears,
)
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


@register_method(
    "moelora",
    launchers=("single", "ddp", "zero2"),
    paper="MoELoRA of CoIN (Chen et al., NeurIPS 2024 D&B); baseline in HiDe-LLaVA, LLaVA-c",
    trains="one MoE-LoRA (E experts of rank r/E + a token router per layer), trained on "
           "through all stages, + the projector if lora.train_projector",
    growth="none (E experts fixed up front; by default E = the number of tasks)",
    routes=True,
)
class MoELoRA(Method):
    """CoIN's MoELoRA: LoRA experts of rank r/E mixed per token by a softmax router."""

    Options = MoELoRAOptions
    rank_per_expert = RANK_PER_EXPERT

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
        return self.options.rank or self.rank_per_expert * self.experts

    @property
    def scaling(self) -> float:
        return (self.options.alpha or 2 * self.rank) / self.rank

    # -- training ----------------------------------------------------------------------------
    def make_layer(self, name: str, linear: torch.nn.Linear) -> ExpertLoRALinear:
        """The expert layer that replaces the adapted linear layer ``name``."""
        return MoELoRALinear(linear, self.experts, self.rank, self.scaling,
                             self.context.config.lora.dropout)

    def targets(self) -> list[str]:
        """The language model's linear layers to adapt."""
        return self.context.config.lora.targets

    def train_projector(self) -> bool:
        return self.context.config.lora.train_projector

    def before_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        """Wrap the targeted layers once (stage 1); train the adapters and, if configured, the
        projector."""
        if not expert_layers(model):
            wrap_linears(model, self.targets(), self.make_layer)
        model.requires_grad_(False)
        for layer in expert_layers(model).values():
            for p in layer.adapter_parameters():
                p.requires_grad_(True)
        set_projector_trainable(model, self.train_projector())
        return model

    def after_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        """Nothing to merge: the next stage trains the same experts and routers on."""
        return model

    # -- checkpoints -------------------------------------------------------------------------
    def save(self, model: torch.nn.Module, folder: Path) -> None:
        """The plain model (each wrapped layer's base) and the adapters beside it."""
        super().save(without_experts(model), folder)
        save_expert_layers(model, folder / ADAPTER_FILE)

    def load(self, folder: Path) -> torch.nn.Module:
        model = super().load(folder)
        wrap_linears(model, self.targets(), self.make_layer)
        load_expert_layers(model, folder / ADAPTER_FILE)
        return model

    def state(self) -> dict:
        return {"experts": self.experts, "rank": self.rank}
