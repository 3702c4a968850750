"""Sequential LoRA: one LoRA that keeps training from stage to stage, never merged.

This is how CoIN and MCITlib define their fine-tuning baseline (CoIN
``ETrain/Train/LLaVA/train.py``: ``--previous_task_model_path`` loads the previous task's LoRA
and projector into the new stage; MCITlib ``LoRA-FT``), whereas ``finetune`` trains a fresh
LoRA each stage and merges it (LLaVA-c's "vanilla"). LwF, EWC and replay build on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from cl_bench.method import Method, Stage
from cl_bench.models.lora import (
    activate_adapters,
    add_lora,
    load_adapters,
    lora_beside,
    save_adapters,
    set_projector_trainable,
    without_lora,
)
from cl_bench.registry import register_method


def is_peft(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters that train this stage (LoRA factors and the projector), by name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@contextmanager
def evaluation_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode (no dropout) for the duration, then back as it was."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@register_method(
    "seq_lora",
    launchers=("single", "ddp", "zero2"),
    paper="CoIN (Chen et al., NeurIPS 2024) and MCITlib's LoRA-FT (Guo et al., 2025, by "
          "HiDe-LLaVA's authors): the LoRA fine-tuning baseline",
    trains="one LoRA on the language model + the projector, carried across stages, never merged",
)
class SeqLoRA(Method):
    """One LoRA trained on every stage in turn (kept as a LoRA, never merged)."""

    def adapters(self) -> list[str]:
        """The LoRA adapters the model carries (all active at inference)."""
        return ["default"]

    def before_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        """The first stage adds the LoRA; later stages train the same one further."""
        # as CoIN ETrain/Train/LLaVA/train.py (--previous_task_model_path) and MCITlib LoRA-FT
        if not is_peft(model):
            return add_lora(model, self.context.config.lora)
        activate_adapters(model, self.adapters(), self.adapters())
        set_projector_trainable(model, self.context.config.lora.train_projector)
        return model

    def after_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        """Nothing is merged: the LoRA stays a LoRA."""
        return model

    def eval_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The carried LoRAs beside low-precision weights, so no small update rounds away."""
        return lora_beside(model)

    def save(self, model: torch.nn.Module, folder: Path) -> None:
        """The plain model (base weights and the projector) and the LoRA adapters apart."""
        super().save(without_lora(model), folder)
        save_adapters(model, folder / "lora")

    def load(self, folder: Path) -> torch.nn.Module:
        """The model as the stage left it: every adapter active, the last one trainable."""
        model = load_adapters(super().load(folder), folder / "lora", self.adapters())
        activate_adapters(model, self.adapters(), self.adapters()[-1:])
        return model
