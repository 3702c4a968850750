"""SMoLoRA (Wang et al., "SMoLoRA: Exploring and Defying Dual Catastrophic Forgetting in
Continual Visual Instruction Tuning", arXiv 2411.13949): a separable mixture of LoRA experts.

Each adapted linear layer holds E LoRA experts of rank r/E in two halves. The visual-understanding
(VU) half is routed by the layer input: the top-1 of a router on the input's mean over the
sequence. The instruction-following (IF) half is routed by an instruction embedding: the top-1 of
a router on that embedding. The two halves' outputs are fused per token by a softmax over two
learned scores, one linear score of each half's output. One SMoLoRA trains on through all stages
(the release loads the previous task's adapter, ``--previous_task_model_path``).

The paper's body could not be read here (only its abstract); everything follows the release,
Minato-Zackie/SMoLoRA ``PEFT_SMoLoRA/peft/tuners/smolora.py`` (``SMoLoraLinear.forward``), with
one change the harness requires: the release picks the instruction embedding by the task number
(``--ins_type``, a row of a precomputed table of 384-d sentence embeddings of each task's
instruction template), i.e. the task identity at test time. Here each sample's instruction
embedding is the frozen CLIP text feature of its own question (the encoder HiDe-LLaVA, DISCO and
ModalPrompt use), in training and at inference alike. Differences: docs/recent_methods.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from cl_bench.errors import CLBenchError
from cl_bench.method import MethodContext, Stage
from cl_bench.models.encoders import TEXT_FEATURES, Encoder, suite_encoder
from cl_bench.models.moe_lora import (
    ExpertLoRALinear,
    SampleInputs,
    expert_layers,
    keep_attention_mask,
    new_router,
    sequence_mean,
)
from cl_bench.models.updates import linear_float32
from cl_bench.registry import register_method
from methods.moelora import MoELoRA, MoELoRAOptions

Prompt = tuple[str, Image.Image | None]


@dataclass
class SMoLoRAOptions(MoELoRAOptions):
    """SMoLoRA (defaults: the release's training scripts, ``scripts/SMoLoRA/Train_Eval/*.sh``).
    Dropout, targets and whether the projector trains come from the config's ``lora`` section."""

    experts: int | None = 8
    """E, experts per adapted layer, half VU and half IF (release ``--expert_num 8``)."""
    rank: int | None = None
    """Total rank r, split into E experts of rank r/E (None: 16 per expert, the release's
    ``--lora_r 128`` over 8 experts)."""
    encoder: str | None = None
    """Instruction encoder: a local CLIP folder, 'llava', or None for the suite's default."""
    text_feature: str = "pooled"
    """CLIP text feature used as the instruction embedding: 'pooled' or 'projected'."""

    def __post_init__(self) -> None:
        super().__post_init__()
        problems = []
        if self.experts is not None and (self.experts < 2 or self.experts % 2):
            problems.append(f"method.experts={self.experts}: must be even and >= 2 (half the "
                            "experts are routed by the input, half by the instruction)")
        if self.text_feature not in TEXT_FEATURES:
            problems.append(f"method.text_feature={self.text_feature!r}: expected one of "
                            f"{', '.join(TEXT_FEATURES)}")
        if problems:
            raise CLBenchError("; ".join(problems))


# -- the core terms ------------------------------------------------------------------------------
def top1(scores: torch.Tensor) -> torch.Tensor:
    """One-hot of each row's highest router score, no gradient (release: ``scatter_`` of the
    ``torch.max`` index, so the routers receive none)."""
    return torch.zeros_like(scores).scatter_(-1, scores.argmax(-1, keepdim=True), 1.0)


def fuse(vu: torch.Tensor, follow: torch.Tensor, w_vu: torch.Tensor,
         w_if: torch.Tensor) -> torch.Tensor:
    """Per token ``a_vu * vu + a_if * if`` with ``(a_vu, a_if) = softmax(w_vu . vu, w_if . if)``
    (release: ``lora_fc_A``, ``lora_fc_B``, softmax over the two scores)."""
    scores = torch.cat([vu @ w_vu.T, follow @ w_if.T], dim=-1)
    alpha = torch.softmax(scores, dim=-1)
    return alpha[..., :1] * vu + alpha[..., 1:] * follow


class SMoLoRALinear(ExpertLoRALinear):
    """``base(x) + fuse(VU half routed by the input mean, IF half routed by the instruction)``;
    ``inputs.features``: each sample's instruction embedding.

    The routers are fixed buffers (the release's one-hot routes carry no gradient to them);
    the experts' factors and the two fusion scores train."""

    def __init__(self, base: torch.nn.Linear, experts: int, rank: int, scaling: float,
                 dropout: float, inputs: SampleInputs, instruction_dim: int) -> None:
        super().__init__(base, experts, rank, scaling, dropout)
        self.inputs = inputs
        device = base.weight.device
        half = experts // 2
        self.register_buffer("vu_router", new_router(half, base.in_features, device).data)
        self.register_buffer("if_router", new_router(half, instruction_dim, device).data)
        self.w_vu = new_router(1, base.out_features, device)  # release lora_fc_A
        self.w_if = new_router(1, base.out_features, device)  # release lora_fc_B

    def routes(self, x: torch.Tensor) -> torch.Tensor:
        """Each sample's one-hot choice of a VU and an IF expert (B, E)."""
        pooled = sequence_mean(x.float(), self.inputs.mask_for(x))  # release: mean(x, dim=1)
        vu = top1(pooled @ self.vu_router.T)  # release: top-1 of lora_vu_gate(mean_n x)
        instructions = self.inputs.features_for(x.shape[0]).to(x.device, torch.float32)
        follow = top1(instructions @ self.if_router.T)  # release: top-1 of lora_ins_gate(e)
        return torch.cat([vu, follow], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear_float32(self.base, x)
        gates = self.routes(x).view(x.shape[0], *([1] * (x.ndim - 2)), self.experts, 1)
        h = self.expert_inputs(x) * gates  # A_e dropout(x), the unchosen experts zeroed
        half = self.experts // 2
        cut = half * self.expert_rank
        vu = self.scaling * h[..., :half, :].flatten(-2) @ self.B[:, :cut].T
        follow = self.scaling * h[..., half:, :].flatten(-2) @ self.B[:, cut:].T
        out = out + fuse(vu, follow, self.w_vu, self.w_if)
        return out.to(self.base.weight.dtype)


@register_method(
    "smolora",
    launchers=("single", "ddp", "zero2"),
    paper="SMoLoRA: Wang et al., arXiv 2411.13949; the instruction embedding per "
          "sample (the release picks it by task number)",
    trains="one separable MoE-LoRA (E experts of rank r/E: half routed by the layer input, half "
           "by the instruction's CLIP text feature, fused per token), trained on through all "
           "stages, + the projector if lora.train_projector",
    growth="none (E experts fixed up front)",
    routes=True,
)
class SMoLoRA(MoELoRA):
    """SMoLoRA: visual and instruction experts routed top-1 apart, fused by learned scores."""

    Options = SMoLoRAOptions
    rank_per_expert = 16  # the release's --lora_r 128 over --expert_num 8

    def __init__(self, options: SMoLoRAOptions, context: MethodContext) -> None:
        super().__init__(options, context)
        self.encoder: Encoder = suite_encoder(options.encoder, context, options.text_feature,
                                              "smolora")
        self.instruction_dim = int(self.encoder.text_features(["a"]).shape[-1])
        self.inputs = SampleInputs()
        self.hooked: torch.nn.Module | None = None

    def make_layer(self, name: str, linear: torch.nn.Linear) -> ExpertLoRALinear:
        return SMoLoRALinear(linear, self.experts, self.rank, self.scaling,
                             self.context.config.lora.dropout, self.inputs,
                             self.instruction_dim)

    def watch_mask(self, model: torch.nn.Module) -> None:
        """Keep each forward's attention mask for the VU routers' sequence mean."""
        if self.hooked is not model:
            keep_attention_mask(model, self.inputs)
            self.hooked = model

    def before_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        model = super().before_stage(model, stage)
        self.watch_mask(model)
        return model

    def load(self, folder: Path) -> torch.nn.Module:
        model = super().load(folder)
        self.watch_mask(model)
        return model

    def set_instructions(self, model: torch.nn.Module, prompts: Sequence[Prompt]) -> None:
        """Each row's instruction embedding: the text feature of its own question."""
        features = self.encoder.text_features([question for question, _ in prompts])
        device = next(iter(expert_layers(model).values())).A.device
        self.inputs.features = features.to(device, torch.float32)

    def before_train_batch(self, model: torch.nn.Module, prompts: Sequence[Prompt]) -> None:
        self.set_instructions(model, prompts)

    def before_generate(self, model: torch.nn.Module, prompts: Sequence[Prompt],
                        label: str) -> None:
        if expert_layers(model):
            self.set_instructions(model, prompts)

    def after_evaluation(self, stage: Stage) -> dict:
        return {"encoder": self.encoder.description}
