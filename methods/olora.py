"""O-LoRA: orthogonal subspace learning (Wang et al., Findings of EMNLP 2023).

Each stage adds a fresh LoRA; the earlier stages' LoRAs stay in every forward pass, frozen. The
new LoRA's A is pushed away from the subspaces of all earlier As by the orthogonality loss
lambda_1 * sum_{i<t} L_orth(A_i, A_t), L_orth summing the entries of A_t A_i^T (O-LoRA sec. 3).
At inference every LoRA is active and their outputs are summed, which is the concatenation
[B_1 .. B_t][A_1; ..; A_t] that O-LoRA evaluates. Checked against O-LoRA's
``src/uie_trainer_lora.py`` and MCITlib's ``OLoRA/llava/train/llava_trainer.py`` (both sum the
absolute entries of A_t A_i^T; MCITlib weights it 0.05 for LLaVA).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cl_bench.errors import CLBenchError
from cl_bench.method import MethodContext, Stage
from cl_bench.models.lora import activate_adapters, add_lora
from cl_bench.registry import register_method
from methods.seq_lora import SeqLoRA

NORMS = ("l1", "squared")


@dataclass
class OLoRAOptions:
    """O-LoRA options (defaults: MCITlib's LLaVA port)."""

    orth_lambda: float = 0.05
    """lambda_1, the weight of the orthogonality loss (MCITlib's LLaVA O-LoRA: 0.05; O-LoRA's
    own code defaults to 0.5 for T5 and LLaMA)."""
    orth_norm: str = "l1"
    """How the entries of A_t A_i^T add up: l1 (their absolute values, as O-LoRA's and MCITlib's
    code) or squared (their squares, as the O-LoRA paper writes L_orth)."""

    def __post_init__(self) -> None:
        if not self.orth_lambda >= 0:
            raise CLBenchError(f"method.orth_lambda={self.orth_lambda}: must be >= 0")
        if self.orth_norm not in NORMS:
            raise CLBenchError(f"method.orth_norm={self.orth_norm!r}: expected one of {NORMS}")


def orthogonality_loss(new: torch.Tensor, previous: Sequence[torch.Tensor],
                       norm: str) -> torch.Tensor:
    """sum_i L_orth(A_i, A_t): the entries of A_t A_i^T (A: rank x in) summed as |x| or x^2."""
    total = new.new_zeros((), dtype=torch.float32)
    for old in previous:
        overlap = new.float() @ old.float().T  # O-LoRA sec. 3: O_{i,t} = A_i^T A_t, transposed
        # L_orth: O-LoRA src/uie_trainer_lora.py and MCITlib llava_trainer.py sum |O| (l1)
        total = total + (overlap.abs().sum() if norm == "l1" else overlap.pow(2).sum())
    return total


@register_method(
    "olora",
    launchers=("single", "ddp", "zero2"),
    paper="O-LoRA (Wang et al., Findings of EMNLP 2023), sec. 3; a baseline of HiDe-LLaVA "
          "Tables 1-2 and LLaVA-c Tables 2-3 / Fig. 7",
    trains="a fresh LoRA on the language model + the projector each stage, the earlier "
           "LoRAs frozen in the forward pass",
    growth="one LoRA per task kept (all summed at inference: their concatenation)",
)
class OLoRA(SeqLoRA):
    """A new LoRA per stage, orthogonal to the frozen earlier ones; all summed at inference."""

    Options = OLoRAOptions

    def __init__(self, options: OLoRAOptions, context: MethodContext) -> None:
        super().__init__(options, context)
        self.names: list[str] = []
        self.pairs: list[tuple[torch.Tensor, list[torch.Tensor]]] = []

    def adapters(self) -> list[str]:
        return list(self.names)

    def before_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        """A fresh LoRA for this stage; the earlier ones stay active and frozen."""
        name = f"stage_{stage.index}"
        previous = [n for n in self.names if n != name]
        model = add_lora(model, self.context.config.lora, name)
        self.names = [*previous, name]
        activate_adapters(model, self.names, [name])
        self.pairs = lora_a_pairs(model, name, previous)
        return model

    def extra_losses(self, model: torch.nn.Module, inputs: dict, outputs) -> dict:
        if not self.pairs:
            return {}
        total = sum(orthogonality_loss(new, old, self.options.orth_norm)
                    for new, old in self.pairs)
        return {"orth": self.options.orth_lambda * total}  # O-LoRA: L + lambda_1 sum L_orth

    def after_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        self.pairs = []
        return super().after_stage(model, stage)

    def state(self) -> dict:
        return {"adapters": self.names}

    def load_state(self, state: dict) -> None:
        self.names = list(state.get("adapters", []))


def lora_a_pairs(model: torch.nn.Module, new: str,
                 previous: list[str]) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """For every LoRA layer: its new A and the earlier adapters' As (frozen)."""
    from peft.tuners.lora import LoraLayer

    if not previous:
        return []
    pairs = []
    for module in model.modules():
        if isinstance(module, LoraLayer) and new in module.lora_A:
            old = [module.lora_A[name].weight.detach() for name in previous]
            pairs.append((module.lora_A[new].weight, old))
    return pairs
