"""LLaVA-1.5 (``llava-1.5-7b-hf`` and the micro world's tiny LLaVA): Llama/Vicuna text model,
CLIP vision tower, two-layer MLP projector.

Conversations: ``vicuna_v1``, LLaVA-1.5's training template (``conv_vicuna_v1`` of the LLaVA
repository: the system sentence, ``USER:``/``ASSISTANT:`` turns separated by a space, each answer
closed by ``</s>``), and ``llava_hf``, the same turns without the system sentence as the
llava-hf model card prompts (the micro world's base model was trained with it). Images:
``pad`` expands an image to a square filled with the image processor's mean colour before
resizing, as LLaVA-1.5 trains and evaluates (``image_aspect_ratio: pad``); ``crop`` leaves the
processor's resize and centre crop alone.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from cl_bench.errors import CLBenchError
from cl_bench.models.backbones import Backbone, Conversation, register_backbone

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions."
)


def pad_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """``image`` centred on a square canvas of its longer side, filled with ``fill``."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _named(model: torch.nn.Module, suffix: str) -> torch.nn.Module:
    for name, module in model.named_modules():
        if name.endswith(suffix):
            return module
    raise CLBenchError(f"model has no {suffix}: is it a LLaVA model?")


@register_backbone
class Llava15(Backbone):
    """LLaVA-1.5 as transformers' ``LlavaForConditionalGeneration`` lays it out."""

    model_type = "llava"
    conversations = {
        "vicuna_v1": Conversation("vicuna_v1", VICUNA_SYSTEM),
        "llava_hf": Conversation("llava_hf", ""),
    }
    aspect_ratios = ("pad", "crop")
    image_text = "<image>"
    layer_pattern = re.compile(r"language_model\.(?:model\.)?layers\.(\d+)")
    language_prefix = "language_model"

    def load(self, folder: Path, dtype: torch.dtype, attn_implementation: str
             ) -> tuple[torch.nn.Module, Any]:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(
            folder, dtype=dtype, local_files_only=True, attn_implementation=attn_implementation
        )
        return model, AutoProcessor.from_pretrained(folder, local_files_only=True)

    def image_token_id(self, model: torch.nn.Module) -> int:
        return int(model.config.image_token_index)

    def pixel_values(self, image_processor: Any, images: list[Image.Image],
                     aspect_ratio: str) -> torch.Tensor:
        if self.check_aspect_ratio(aspect_ratio) == "pad":
            fill = tuple(int(255 * m) for m in image_processor.image_mean)
            images = [pad_to_square(image, fill) for image in images]
        return image_processor(images, return_tensors="pt")["pixel_values"]

    def projector(self, model: torch.nn.Module) -> torch.nn.Module:
        return _named(model, "multi_modal_projector")

    def vision_tower(self, model: torch.nn.Module) -> torch.nn.Module:
        return _named(model, "vision_tower")
