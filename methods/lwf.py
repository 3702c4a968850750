"""LwF: Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017) on one carried LoRA.

Each step also runs the current batch through the previous stage's model and adds the
distillation of its temperature-softened next-token distributions on the answer positions
(LwF eq. 2-3) to the LLaVA loss. The previous model is the same network with the trainable
parameters (LoRA and projector) as they were when the stage began: only those are copied, and the
teacher pass swaps them in functionally (``torch.func.functional_call``), so nothing else is
duplicated. Checked against Continual-NExT ``swift/trainers/cl/lwf/lwf_pre.py`` (KL of the
softened distributions on the positions with labels, T = 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call

from cl_bench.errors import CLBenchError
from cl_bench.method import Stage
from cl_bench.models.llava import IGNORE_INDEX
from cl_bench.registry import register_method
from methods.seq_lora import SeqLoRA, evaluation_mode, trainable_parameters


@dataclass
class LwFOptions:
    """LwF options (the paper's values)."""

    temperature: float = 2.0
    """T softening both distributions (LwF eq. 3 uses T = 2, as Continual-NExT does)."""
    weight: float = 1.0
    """lambda_o, the weight of the distillation term in the loss (LwF sets it to 1)."""

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise CLBenchError(f"method.temperature={self.temperature}: must be > 0")
        if not self.weight >= 0:
            raise CLBenchError(f"method.weight={self.weight}: must be >= 0")


def distillation(current: torch.Tensor, previous: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over rows of KL(softmax(previous / T) || softmax(current / T)), in fp32.

    LwF eq. 2-3: the cross-entropy of the softened recorded outputs y'_o against the softened
    current ones, minus the recorded outputs' entropy (a constant): the same gradient, and 0
    when the two models agree.
    """
    log_p = torch.log_softmax(previous.float() / temperature, dim=-1)
    log_q = torch.log_softmax(current.float() / temperature, dim=-1)
    # LwF eq. 2-3 (as Continual-NExT swift/trainers/cl/lwf/lwf_pre.py, without its T^2)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


@register_method(
    "lwf",
    launchers=("single", "ddp", "zero2"),
    paper="LwF (Li & Hoiem, ECCV 2016 / TPAMI 2017), eq. 2-3; a baseline of HiDe-LLaVA "
          "Tables 1-2 and LLaVA-c Table 2 / Fig. 7",
    trains="one LoRA on the language model + the projector, carried across stages "
           "(as seq_lora), with distillation from the previous stage's model",
    growth="none (a copy of the trainable parameters during a stage, as the teacher)",
)
class LwF(SeqLoRA):
    """Sequential LoRA + distillation of the previous stage's outputs on the current inputs."""

    Options = LwFOptions

    def before_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        """Keep the trainable parameters as they start the stage: the previous model."""
        model = super().before_stage(model, stage)
        self.student = model
        self.teacher = {n: p.detach().clone() for n, p in trainable_parameters(model).items()}
        return model

    def extra_losses(self, model: torch.nn.Module, inputs: dict, outputs) -> dict:
        """LwF eq. 2-3 on the positions that predict an answer token (teacher-forced)."""
        given = {key: value for key, value in inputs.items() if key != "labels"}
        with torch.no_grad(), evaluation_mode(self.student):
            previous = functional_call(self.student, self.teacher, args=(), kwargs=given)
        answer = inputs["labels"][:, 1:] != IGNORE_INDEX  # logits at t predict token t + 1
        if not answer.any():
            return {}
        term = distillation(outputs.logits[:, :-1][answer], previous.logits[:, :-1][answer],
                            self.options.temperature)
        return {"lwf": self.options.weight * term}  # LwF: L = L_new + lambda_o * L_old

    def after_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        self.teacher = {}
        return super().after_stage(model, stage)
