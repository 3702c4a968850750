"""CL-MoE (Huai et al., CVPR 2025): MoE-LoRA experts carried across tasks with a momentum update.

The paper (arXiv 2503.00413) has two parts: RMoE, a Dual-Router MoE mixing an instance-level
router G^I(x) with a task-level router G^T(t),
``x^ = beta (alpha/r) sum_i G^I(x)_i E_i(x) + (1 - beta) (alpha/r) sum_i G^T(t)_i E_i(x)``, and
MMoE, a momentum update of the experts after each task, ``theta_t = lambda o theta_{t-1} +
(1 - lambda) o phi_t`` with lambda set by each expert's role for the tasks. Only these two
formulas of the paper could be read here (its body could not); the rest follows the authors'
release, ECNU-ICALK/CL-MoE:

- training (``CLMoE/peft/tuners/clitmoelora.py``): CoIN's MoELoRA, a softmax token router over E
  LoRA experts summed densely, each task trained on from the previous task's merged adapter;
  while training, every token's two highest router weights name two experts (none on a tie);
- ``statistic.py``: a task's expert index is the ``index_size`` (8) experts counted most often,
  over all layers;
- ``params.py`` (MMoE): after task t >= 2, expert e's LoRA factors become
  ``lambda_e theta_{t-1} + (1 - lambda_e) phi_t`` with ``lambda_e = 1 - momentum`` (0.3) for the
  experts in task t-1's index but not in task t's, and ``lambda_e = momentum`` (0.7) for all the
  others; the routers and the projector keep their trained values.

The task-level router G^T(t) is not in the release (its test-time mixing is commented out there,
and the paper's task indexing could not be read): it is left out, so inference is the
instance-level MoE-LoRA (as the release's evaluation). MCITlib's CL-MoE runs neither the
statistics nor the momentum update (its scripts train MoELoRA from task to task).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cl_bench.errors import CLBenchError
from cl_bench.method import MethodContext, Stage
from cl_bench.models.moe_lora import ExpertLoRALinear, MoELoRALinear, expert_layers
from cl_bench.registry import register_method
from methods.moelora import MoELoRA, MoELoRAOptions


@dataclass
class CLMoEOptions(MoELoRAOptions):
    """CL-MoE (defaults: ECNU-ICALK/CL-MoE ``params.py`` and ``statistic.py``). ``experts``,
    ``rank`` and ``alpha`` as MoELoRA's (the release: 4 experts, rank 32, alpha 64 on 10 tasks;
    MCITlib's UCIT: 6 experts, rank 96)."""

    momentum: float = 0.7
    """The release's alpha: lambda of the experts the new task shares or adds (the old factors
    keep this share); 1 - momentum for the experts only the previous task used."""
    index_size: int = 8
    """Experts kept in a task's index: the most often counted among the tokens' top two
    (``statistic.py``: 8)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        problems = []
        if not 0.0 <= self.momentum <= 1.0:
            problems.append(f"method.momentum={self.momentum}: must be in [0, 1]")
        if self.index_size < 1:
            problems.append(f"method.index_size={self.index_size}: must be >= 1")
        if problems:
            raise CLBenchError("; ".join(problems))


# -- CL-MoE's expert statistics and momentum update ----------------------------------------------
def top_two_counts(gates: torch.Tensor) -> torch.Tensor:
    """How often each expert is among a token's two highest router weights (E,); a token whose
    two highest weights tie counts for none (ECNU-ICALK/CL-MoE ``clitmoelora.py``)."""
    experts = gates.shape[-1]
    flat = gates.reshape(-1, experts)
    if experts < 2:
        return torch.full((1,), flat.shape[0], dtype=torch.long, device=gates.device)
    values, chosen = flat.topk(2, dim=-1)
    kept = chosen[values[:, 0] != values[:, 1]].reshape(-1)
    return torch.bincount(kept, minlength=experts)


def task_index(counts: torch.Tensor, size: int) -> list[int]:
    """The task's expert index: the ``size`` most counted experts, ties by expert number, never
    an expert counted zero times (``statistic.py``)."""
    ranked = sorted(range(len(counts)), key=lambda e: (-int(counts[e]), e))
    return [e for e in ranked if int(counts[e]) > 0][:size]


def expert_momenta(experts: int, previous: list[int], current: list[int],
                   momentum: float) -> torch.Tensor:
    """lambda per expert (CL-MoE MMoE; ``params.py``): 1 - momentum for the experts only the
    previous task's index holds, momentum for every other."""
    only_before = set(previous) - set(current)
    return torch.tensor([1.0 - momentum if e in only_before else momentum
                         for e in range(experts)], dtype=torch.float64)


@torch.no_grad()
def momentum_update(layer: ExpertLoRALinear, before: tuple[torch.Tensor, torch.Tensor],
                    lam: torch.Tensor) -> None:
    """``theta_t = lambda o theta_{t-1} + (1 - lambda) o phi_t`` (CL-MoE MMoE) on each expert's
    rows of A and columns of B, in float32; ``before``: (A, B) at the task's start."""
    per_rank = lam.to(layer.A.device, torch.float32).repeat_interleave(layer.expert_rank)
    old_a, old_b = before
    layer.A.copy_(per_rank[:, None] * old_a.float() + (1 - per_rank[:, None]) * layer.A.float())
    layer.B.copy_(old_b.float() * per_rank + layer.B.float() * (1 - per_rank))


class CountingMoELoRALinear(MoELoRALinear):
    """A MoELoRA layer that, while training, adds each token's top-two experts to a counter
    shared by all layers (recomputed forwards under activation checkpointing count twice, which
    leaves the ranking as it is)."""

    def __init__(self, base: torch.nn.Linear, experts: int, rank: int, scaling: float,
                 dropout: float, counts: torch.Tensor) -> None:
        super().__init__(base, experts, rank, scaling, dropout)
        self.counts = counts

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        gates = super().gates(x)
        if self.training:
            self.counts += top_two_counts(gates.detach()).to(self.counts.device)
        return gates


@register_method(
    "cl_moe",
    paper="CL-MoE: Huai et al., CVPR 2025 (arXiv 2503.00413), MMoE momentum update; the "
          "task-level router is not in its release and left out",
    trains="one MoE-LoRA (E experts of rank r/E + a token router per layer), trained on through "
           "all stages, + the projector if lora.train_projector; after each stage the experts "
           "are mixed with their values before it by momentum",
    growth="a task's expert index (index_size integers); while training, a float32 copy of the "
           "adapters' factors",
    routes=True,
    launchers=("single",),  # under DDP each rank would count, index and mix on its own tokens
)
class CLMoE(MoELoRA):
    """CL-MoE: MoELoRA experts mixed after each task with their values before it by momentum.

    Each expert's momentum depends on whether the previous and the current task used it most."""

    Options = CLMoEOptions

    def __init__(self, options: CLMoEOptions, context: MethodContext) -> None:
        super().__init__(options, context)
        self.counts: torch.Tensor | None = None  # this stage's top-two counts, all layers
        self.indices: list[list[int]] = []  # each finished stage's expert index
        self.before: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def make_layer(self, name: str, linear: torch.nn.Linear) -> ExpertLoRALinear:
        device = linear.weight.device
        if self.counts is None or self.counts.device != device:
            start = self.counts if self.counts is not None else torch.zeros(self.experts)
            self.counts = start.to(device, torch.long)
        return CountingMoELoRALinear(linear, self.experts, self.rank, self.scaling,
                                     self.context.config.lora.dropout, self.counts)

    def before_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        """MoELoRA's, with the counts zeroed and, after the first task, the adapters' factors
        kept as theta_{t-1}."""
        model = super().before_stage(model, stage)
        self.counts.zero_()
        self.before = {name: (layer.A.detach().clone(), layer.B.detach().clone())
                       for name, layer in expert_layers(model).items()} if self.indices else {}
        return model

    def after_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        """The task's expert index, then (after the first task) the momentum update."""
        index = task_index(self.counts, self.options.index_size)
        if self.before:
            lam = expert_momenta(self.experts, self.indices[-1], index, self.options.momentum)
            for name, layer in expert_layers(model).items():
                momentum_update(layer, self.before[name], lam)
        self.indices.append(index)
        self.before = {}
        return model

    def after_evaluation(self, stage: Stage) -> dict:
        return {"expert_index": self.indices[-1], "top_two_counts": self.counts.tolist()}

    def state(self) -> dict:
        counts = self.counts.tolist() if self.counts is not None else []
        return {**super().state(), "indices": self.indices, "counts": counts}

    def load_state(self, state: dict) -> None:
        """The indices and (mid-stage) the counts so far."""
        self.indices = [[int(e) for e in index] for index in state.get("indices", [])]
        counts = torch.tensor(state.get("counts") or [0] * (self.experts or 1), dtype=torch.long)
        if self.counts is None:
            self.counts = counts
        else:
            self.counts.copy_(counts)
