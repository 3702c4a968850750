"""LoRA through PEFT on the language model's linear layers, stored factors loaded back, and the
projector's trainability and weights.

Which layers are the language model's and where the projector is comes from the model's
backbone. Adapters are float32 whatever the frozen weights' dtype (PEFT's
``autocast_adapter_dtype``); after a stage they become consolidated updates beside the weights
(``cl_bench.models.updates``), never a rounding of low-precision weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cl_bench.config import LoraSettings
from cl_bench.errors import CLBenchError
from cl_bench.models.backbones import backbone_of
from cl_bench.models.deltas import PEFT_PREFIX, LoraFactors, stage_delta
from cl_bench.models.sharing import shallow_copy
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


def without_lora(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under a PEFT model's LoRA layers, unmerged and sharing every weight (to
    save the base weights of a model whose LoRA is kept apart); a plain model is returned as is."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel):
        return model
    plain = shallow_copy(model.get_base_model())
    for name, module in list(plain.named_modules()):
        if isinstance(module, LoraLayer):
            plain.set_submodule(name, module.get_base_layer())
    return plain


def activate_adapters(model: torch.nn.Module, active: list[str], trainable: list[str]) -> None:
    """Make ``active`` the adapters of every forward (their outputs summed), of which only
    ``trainable`` train; the projector trains or not as before."""
    projector_grad = [p.requires_grad for p in projector(model).parameters()]
    model.base_model.set_adapter(active)  # PEFT marks every active adapter trainable
    frozen = [f".{name}." for name in active if name not in trainable]
    for name, param in model.named_parameters():
        if "lora_" in name and any(tag in name for tag in frozen):
            param.requires_grad_(False)
    for param, grad in zip(projector(model).parameters(), projector_grad, strict=True):
        param.requires_grad_(grad)


def save_adapters(model: torch.nn.Module, folder: Path) -> None:
    """Every LoRA adapter of a PEFT model, in PEFT's own format (``PeftModel.from_pretrained``
    reads them back; an adapter other than ``default`` sits in a sub-folder of its name)."""
    model.save_pretrained(str(folder))


def load_adapters(model: torch.nn.Module, folder: Path, names: list[str]) -> torch.nn.Module:
    """A plain ``model`` wrapped with the adapters ``names`` saved by ``save_adapters``."""
    from peft import PeftModel

    def where(name: str) -> Path:
        path = folder if name == "default" else folder / name
        if not (path / "adapter_config.json").is_file():
            raise CLBenchError(f"{path}: no saved LoRA adapter {name!r} (adapter_config.json)")
        return path

    peft_model = PeftModel.from_pretrained(model, str(where(names[0])), adapter_name=names[0],
                                           is_trainable=True)
    for name in names[1:]:
        peft_model.load_adapter(str(where(name)), adapter_name=name, is_trainable=True)
    return peft_model
