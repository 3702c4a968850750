"""Model Tailor (Zhu et al., "Model Tailor: Mitigating Catastrophic Forgetting in Multi-modal
Large Language Models", ICML 2024), after every stage of a continual run.

Each stage fine-tunes a fresh LoRA (and the projector) from the current model; afterwards every
adapted weight is tailored: only the most important entries of its update are kept (the model
patch: a salience and sensitivity fusion), the others revert to the weight before the stage,
and the kept entries compensate for them (the patch decorator, an OBS-style update through the
inverse Hessian of the layer's inputs on the task's data). Layers are tailored bottom to top,
each with calibration inputs from the already tailored layers below, and the projector reverts
to its value before the stage, as in the reference ``main_model_tailor.py``. Model Tailor is a
single-task method; HiDe-LLaVA (Table 7) runs it after every task of UCIT, as here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cl_bench.errors import CLBenchError
from cl_bench.method import Method, MethodContext, Stage
from cl_bench.models.backbones import backbone_of
from cl_bench.models.lora import merge_lora, projector_weights, set_projector_weights
from cl_bench.registry import register_method
from methods.model_tailor.calibration import calibration_batches, layer_hessians
from methods.model_tailor.tailoring import COMPENSATIONS, tailor_weight


@dataclass
class ModelTailorOptions:
    """Model Tailor's options (defaults: the reference main_model_tailor.py / sparsegpt.py)."""

    sparsity: float = 0.9
    """Share of each block's entries reverted to the weight before the stage (reference 0.9:
    the model patch keeps at most 10 %)."""
    salience_weight: float = 0.8
    """Importance = w * z(salience) + (1 - w) * z(sensitivity) (reference 0.8 / 0.2)."""
    calibration_samples: int = 128
    """Training conversations of the task that estimate each layer's input Hessian (ref. 128)."""
    calibration_batch: int = 8
    """Calibration conversations per forward pass."""
    blocksize: int = 128
    """Input columns tailored together (reference 128)."""
    damp: float = 0.01
    """Hessian damping, a share of its mean diagonal (reference percdamp 0.01)."""
    compensation: str = "reference"
    """Sign of the patch decorator's error spread: reference (+, the released code), obs (-,
    Optimal Brain Surgeon / SparseGPT), none (plain reversion)."""
    revert_projector: bool = True
    """The projector returns to its value before the stage (the reference restores the
    pretrained projector)."""

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.sparsity < 1:
            problems.append(f"method.sparsity={self.sparsity}: a share in [0, 1)")
        if not 0 <= self.salience_weight <= 1:
            problems.append(f"method.salience_weight={self.salience_weight}: a weight in [0, 1]")
        for name in ("calibration_samples", "calibration_batch", "blocksize"):
            if getattr(self, name) < 1:
                problems.append(f"method.{name}={getattr(self, name)}: must be >= 1")
        if self.damp < 0:
            problems.append(f"method.damp={self.damp}: must be >= 0")
        if self.compensation not in COMPENSATIONS:
            problems.append(f"method.compensation={self.compensation!r}: expected one of "
                            f"{', '.join(COMPENSATIONS)}")
        if problems:
            raise CLBenchError("; ".join(problems))


def lora_layers(layer: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The PEFT LoRA linear layers inside one decoder layer, by name within it."""
    return {name: m for name, m in layer.named_modules()
            if hasattr(m, "lora_A") and m.active_adapters and m.active_adapters[0] in m.lora_A}


@register_method(
    "model_tailor",
    paper="Model Tailor: Zhu et al., ICML 2024 (model patch + patch decorator), after every "
    "stage as in HiDe-LLaVA Table 7",
    trains="a fresh LoRA on the language model + the projector each stage; then each adapted "
    "weight keeps only its most important updated entries (compensated), the projector reverts",
    growth="none",
)
class ModelTailor(Method):
    """Model Tailor: after each stage, keep a compensated patch of the update, revert the rest."""

    Options = ModelTailorOptions

    def __init__(self, options: ModelTailorOptions, context: MethodContext) -> None:
        super().__init__(options, context)
        self.projector_before: dict[str, torch.Tensor] = {}
        self.patch_share: float | None = None

    def before_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        model = super().before_stage(model, stage)
        self.projector_before = projector_weights(model)
        return model

    def after_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        """Tailor every adapted weight, bottom layer first; revert the projector; merge."""
        o, cfg = self.options, self.context.config
        model.eval()
        batches = calibration_batches(self.context.bundle, self.training_samples(stage),
                                      o.calibration_samples, o.calibration_batch,
                                      cfg.train.max_length, cfg.seed + stage.index)
        kept = total = 0
        for layer in backbone_of(model).decoder_layers(model):
            targets = lora_layers(layer)
            if not targets:
                continue
            hessians = layer_hessians(model, layer, targets, batches)
            for name, module in targets.items():
                before = module.base_layer.weight
                adapter = module.active_adapters[0]
                B, A = module.lora_B[adapter].weight, module.lora_A[adapter].weight
                tuned = before.float() + module.scaling[adapter] * (B.float() @ A.float())
                tailored = tailor_weight(tuned, before, hessians[name], o.sparsity,
                                         o.salience_weight, o.blocksize, o.damp, o.compensation)
                kept += int((tailored != before.float()).sum())
                total += before.numel()
                with torch.no_grad():
                    before.copy_(tailored.to(before.dtype))
                    B.zero_()  # the tailored update now lives in the base weight
        if o.revert_projector:
            set_projector_weights(model, self.projector_before)
        self.patch_share = kept / total if total else None
        return merge_lora(model)

    def after_evaluation(self, stage: Stage) -> dict:
        """The share of adapted-weight entries the stage changed (the patch, compensated)."""
        return {"patch_share": self.patch_share}
