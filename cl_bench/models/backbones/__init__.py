"""Model families behind one interface: what differs between LLaVA-1.5, Qwen2.5-VL, InternVL or
LLaVA-OneVision lives in one module per family here, registered by the ``model_type`` of the
model's ``config.json``.

A ``Backbone`` says how a local folder loads, which chat templates it speaks
(``model.conversation``), how images become pixels (``model.image_aspect_ratio``), and where the
decoder layers, the projector and the LoRA-able linear layers are. Methods and analyses ask the
backbone of their model (``backbone_of``) instead of naming modules themselves. Adding a family is
one module registering a Backbone plus its line in ``FAMILIES``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from cl_bench.errors import CLBenchError
from cl_bench.registry import Registry, unknown_name_error

# model_type of config.json -> the module registering its backbone (imported on first use)
FAMILIES = {"llava": "cl_bench.models.backbones.llava"}
BACKBONES: Registry = Registry("backbone")


@dataclass(frozen=True)
class Conversation:
    """A chat template in the style of LLaVA's ``SeparatorStyle.TWO``: the system text, then
    ``ROLE: message`` turns; a user turn ends with ``sep``, an assistant turn with the EOS."""

    name: str
    system: str
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "

    def render(
        self, turns: Sequence[tuple[str, str | None]], image: str | None, eos: str
    ) -> tuple[str, list[tuple[int, int]]]:
        """The conversation's text and the character span of each answer (its EOS included).

        ``image`` (the placeholder text) opens the first user message; a last answer of None
        ends the text with the assistant's role, where generation starts.
        """
        text = self.system + self.sep if self.system else ""
        spans = []
        for i, (question, answer) in enumerate(turns):
            message = f"{image}\n{question}" if image is not None and i == 0 else question
            text += f"{self.roles[0]}: {message}{self.sep}{self.roles[1]}:"
            if answer is None:
                if i != len(turns) - 1:
                    raise CLBenchError("only the last turn of a conversation may lack an answer")
                break
            start = len(text)
            text += f" {answer}{eos}"
            spans.append((start, len(text)))
        return text, spans


class Backbone:
    """The interface a model family implements (see the module docstring)."""

    model_type: ClassVar[str]
    conversations: ClassVar[dict[str, Conversation]]
    aspect_ratios: ClassVar[tuple[str, ...]]
    image_text: ClassVar[str]  # the placeholder one image takes in a prompt's text

    def load(self, folder: Path, dtype: torch.dtype, attn_implementation: str
             ) -> tuple[torch.nn.Module, Any]:
        """The model (on the CPU, in ``dtype``) and its processor, from a local folder."""
        raise NotImplementedError

    def image_token_id(self, model: torch.nn.Module) -> int:
        raise NotImplementedError

    def pixel_values(self, image_processor: Any, images: list[Image.Image],
                     aspect_ratio: str) -> torch.Tensor:
        """A batch of images as the vision tower takes them, preprocessed like the family."""
        raise NotImplementedError

    def projector(self, model: torch.nn.Module) -> torch.nn.Module:
        raise NotImplementedError

    def vision_tower(self, model: torch.nn.Module) -> torch.nn.Module:
        raise NotImplementedError

    layer_pattern: ClassVar[re.Pattern]  # a decoder layer's module name; group 1: its index
    language_prefix: ClassVar[str]  # in the name of every language-model module

    def conversation(self, name: str) -> Conversation:
        if name not in self.conversations:
            raise unknown_name_error(f"{self.model_type} conversation (model.conversation)",
                                     name, list(self.conversations))
        return self.conversations[name]

    def check_aspect_ratio(self, name: str) -> str:
        if name not in self.aspect_ratios:
            raise CLBenchError(f"model.image_aspect_ratio={name!r}: {self.model_type} takes "
                               f"{' or '.join(self.aspect_ratios)}")
        return name

    def layer_index(self, module_name: str) -> int | None:
        """The decoder layer a module (or a layer itself) belongs to, or None."""
        match = re.search(self.layer_pattern.pattern + r"(?:\.|$)", module_name)
        return int(match.group(1)) if match else None

    def decoder_layers(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The language model's decoder layers, bottom to top (PEFT-wrapped or not)."""
        found: dict[int, torch.nn.Module] = {}
        for name, module in model.named_modules():
            match = re.search(self.layer_pattern.pattern + "$", name)
            if match:
                found[int(match.group(1))] = module
        if not found:
            raise CLBenchError(f"no decoder layers ({self.layer_pattern.pattern}) in the model")
        return [found[i] for i in sorted(found)]

    def lora_target_regex(self, targets: list[str]) -> str:
        """PEFT target pattern: the named linear layers of the language model only."""
        return rf".*{re.escape(self.language_prefix)}.*\.({'|'.join(targets)})$"

    def language_linears(self, model: torch.nn.Module,
                         targets: list[str]) -> dict[str, torch.nn.Linear]:
        """The language model's linear layers named in ``targets``, by module name."""
        return {
            name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and self.language_prefix in name
            and name.rsplit(".", 1)[-1] in targets
        }


def get_backbone(model_type: str) -> Backbone:
    """The backbone registered for ``model_type`` (its module imported on first use)."""
    if model_type in FAMILIES:
        importlib.import_module(FAMILIES[model_type])
    if model_type not in BACKBONES.names():
        raise unknown_name_error("model family (config.json model_type)", model_type,
                                 list(FAMILIES))
    return BACKBONES.get(model_type)


def backbone_of(model: torch.nn.Module) -> Backbone:
    """The backbone of a model (PEFT-wrapped, or a method's assembled copy, alike)."""
    config = getattr(model, "config", None)
    if config is None:
        raise CLBenchError(f"{type(model).__name__} has no config: not a Hugging Face model")
    return get_backbone(config.model_type)


def register_backbone(cls: type[Backbone]) -> type[Backbone]:
    """Class decorator: register a backbone under its ``model_type``."""
    BACKBONES.register(cls.model_type)(cls())
    return cls
