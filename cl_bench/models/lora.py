"""LoRA through PEFT on the language model's linear layers, and the projector's trainability."""

from __future__ import annotations

import torch

from cl_bench.config import LoraSettings
from cl_bench.errors import CLBenchError


def lora_target_regex(targets: list[str]) -> str:
    """PEFT target pattern: the given linear layers of the language model only."""
    return rf".*language_model.*\.({'|'.join(targets)})$"


def add_lora(model: torch.nn.Module, settings: LoraSettings, name: str = "default"):
    """Wrap (or extend) ``model`` with a fresh LoRA adapter; the projector trains if asked."""
    from peft import LoraConfig, PeftModel, get_peft_model

    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=lora_target_regex(settings.targets),
    )
    if isinstance(model, PeftModel):
        model.add_adapter(name, config)
        model.set_adapter(name)
    else:
        model = get_peft_model(model, config, adapter_name=name)
    set_projector_trainable(model, settings.train_projector)
    return model


def set_projector_trainable(model: torch.nn.Module, trainable: bool) -> None:
    for param in projector(model).parameters():
        param.requires_grad_(trainable)


def projector(model: torch.nn.Module) -> torch.nn.Module:
    """The multimodal projector, whether or not ``model`` is wrapped by PEFT."""
    for name, module in model.named_modules():
        if name.endswith("multi_modal_projector"):
            return module
    raise CLBenchError("model has no multi_modal_projector: is it a LLaVA model?")


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every LoRA adapter into the weights and return the plain model."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def language_model_linears(
    model: torch.nn.Module, targets: list[str]
) -> dict[str, torch.nn.Linear]:
    """The language model's linear layers named in ``targets``, by module name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and "language_model" in name
        and name.rsplit(".", 1)[-1] in targets
    }
