"""LoRA through PEFT on the language model's linear layers, and the projector's trainability.

Which layers are the language model's and where the projector is comes from the model's
backbone. Adapters are float32 whatever the frozen weights' dtype (PEFT's
``autocast_adapter_dtype``); after a stage they become consolidated updates beside the weights
(``cl_bench.models.updates``), never a rounding of low-precision weights.
"""

from __future__ import annotations

import torch

from cl_bench.config import LoraSettings
from cl_bench.models.backbones import backbone_of
from cl_bench.models.deltas import stage_delta
from cl_bench.models.updates import add_update


def lora_target_regex(model: torch.nn.Module, targets: list[str]) -> str:
    """PEFT target pattern: the given linear layers of the language model only."""
    return backbone_of(model).lora_target_regex(targets)


def add_lora(model: torch.nn.Module, settings: LoraSettings, name: str = "default"):
    """Wrap (or extend) ``model`` with a fresh float32 LoRA adapter; the projector trains if
    asked."""
    from peft import LoraConfig, PeftModel, get_peft_model

    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=lora_target_regex(model, settings.targets),
    )
    if isinstance(model, PeftModel):
        model.add_adapter(name, config)
        model.set_adapter(name)
    else:
        model = get_peft_model(model, config, adapter_name=name, autocast_adapter_dtype=True)
    set_projector_trainable(model, settings.train_projector)
    return model


def set_projector_trainable(model: torch.nn.Module, trainable: bool) -> None:
    for param in projector(model).parameters():
        param.requires_grad_(trainable)


def projector(model: torch.nn.Module) -> torch.nn.Module:
    """The multimodal projector, whether or not ``model`` is wrapped by PEFT."""
    return backbone_of(model).projector(model)


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Consolidate the active LoRA into the model's updates (float32 factors beside
    low-precision weights, merged into float32 ones) and return the plain model."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model
    factors = stage_delta(model, {}).lora
    plain = model.unload()
    for name, update in factors.items():
        add_update(plain, name, update)
    return plain


def language_model_linears(
    model: torch.nn.Module, targets: list[str]
) -> dict[str, torch.nn.Linear]:
    """The language model's linear layers named in ``targets``, by module name."""
    return backbone_of(model).language_linears(model, targets)
