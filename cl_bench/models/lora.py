"""LoRA through PEFT on the language model's linear layers, stored factors loaded back, and the
projector's trainability and weights."""

from __future__ import annotations

import copy
import itertools

import torch

from cl_bench.config import LoraSettings
from cl_bench.errors import CLBenchError
from cl_bench.models.deltas import PEFT_PREFIX, LoraFactors


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


def shallow_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree that shares every parameter and buffer with ``model``."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def projector_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the projector's parameters, by name within the projector."""
    return {n: p.detach().clone() for n, p in projector(model).named_parameters()}


@torch.no_grad()
def set_projector_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load what ``projector_weights`` returned into ``model``'s projector."""
    params = dict(projector(model).named_parameters())
    if set(params) != set(weights):
        raise CLBenchError(f"stored projector parameters {sorted(weights)} do not match the "
                           f"model's {sorted(params)}")
    for name, value in weights.items():
        params[name].copy_(value.to(params[name]))


@torch.no_grad()
def load_lora_factors(model: torch.nn.Module, lora: dict[str, LoraFactors]) -> None:
    """Copy stored factors (module names without the PEFT prefix) into the active adapter of a
    PEFT model, e.g. to train a stored LoRA further."""
    for name, f in lora.items():
        module = model.get_submodule(PEFT_PREFIX + name)
        adapter = module.active_adapters[0]
        if abs(module.scaling[adapter] - f.scaling) > 1e-9 or \
                module.lora_A[adapter].weight.shape != f.A.shape:
            raise CLBenchError(f"stored LoRA for {name} has another rank or scaling than the "
                               "model's adapter: keep the LoRA rank and alpha of the run")
        module.lora_A[adapter].weight.copy_(f.A)
        module.lora_B[adapter].weight.copy_(f.B)


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
