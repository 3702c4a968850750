"""The HiDe-LLaVA evaluation model (Algorithm 1, lines 8-17): routed and fused layers by layout
(Table 3), and the parameters it loads at inference."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from cl_bench.errors import CLBenchError
from cl_bench.models.routed_lora import RoutedLoRALinear, Routing
from cl_bench.models.sharing import shallow_copy
from methods.hide_llava.experts import TaskExpert
from methods.hide_llava.fusion import FusedLoRALinear, fused_factors
from methods.hide_llava.options import LAYOUTS, HiDeOptions

PARAMS_NOTE = (
    "parameters loaded at inference: total = model + lora + anchors; lora counts what Table 3 "
    "counts (routed layers keep every task's LoRA, fused layers one LoRA of the task rank); "
    "encoder = the routing encoder's own parameters, loaded too"
)
_LAYER_INDEX = re.compile(r"language_model\.(?:model\.)?layers\.(\d+)\.")



# -- assembly -----------------------------------------------------------------------------------
@dataclass
class InferenceParams:
    """Parameters loaded at inference: the model, the LoRA kept (Table 3's count), anchors."""

    model: int
    lora: int
    anchors: int
    encoder: int

    @property
    def total(self) -> int:
        return self.model + self.lora + self.anchors

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "total": self.total}


def layer_index(module_name: str) -> int:
    match = _LAYER_INDEX.search(module_name)
    if match is None:
        raise CLBenchError(f"LoRA module {module_name!r} is not inside a decoder layer")
    return int(match.group(1))


def layer_modes(experts: list[TaskExpert], layout: str, top_layers: int,
                n_layers: int) -> dict[str, str]:
    """The mode (expand | merge | none) of each LoRA-carrying module."""
    if layout not in LAYOUTS:
        raise CLBenchError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    top, rest = LAYOUTS[layout]
    names = list(experts[0].lora)
    for expert in experts[1:]:
        if set(expert.lora) != set(names):
            raise CLBenchError(
                f"stage {expert.stage} ({expert.task}) has LoRA on other modules than stage "
                f"{experts[0].stage}: HiDe-LLaVA needs the same LoRA targets in every stage"
            )
    return {n: top if layer_index(n) >= n_layers - top_layers else rest for n in names}


def assemble(
    model: torch.nn.Module,
    experts: list[TaskExpert],
    options: HiDeOptions,
    routing: Routing,
) -> tuple[torch.nn.Module, InferenceParams]:
    """The evaluation model of HiDe-LLaVA Algorithm 1 (lines 8-17); ``model`` is not changed."""
    from cl_bench.analysis.cka import decoder_layers

    n_layers = len(decoder_layers(model))
    modes = layer_modes(experts, options.layout, options.top_layers, n_layers)
    assembled = shallow_copy(model)
    lora_params = 0
    for name, mode in modes.items():
        if mode == "none":
            continue
        base = assembled.get_submodule(name)
        factors = [e.lora[name] for e in experts]
        if mode == "expand":
            module: RoutedLoRALinear | FusedLoRALinear = RoutedLoRALinear(base, factors, routing)
        else:
            B, A = fused_factors(factors, options.fusion, options.fusion_weight)
            module = FusedLoRALinear(base, B, A, max(f.A.shape[0] for f in factors))
        lora_params += module.lora_parameters()
        assembled.set_submodule(name, module)
    routed = "expand" in modes.values()
    anchors = sum(
        sum(a.numel() for a in (e.image_anchor, e.text_anchor) if a is not None) for e in experts
    ) if routed else 0
    plain = sum(p.numel() for p in model.parameters())
    return assembled, InferenceParams(plain, lora_params, anchors, 0)
