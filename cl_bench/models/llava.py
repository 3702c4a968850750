"""Local Hugging Face model folders as bundles: loading (placed on the run's device, in its
dtype), prompts and their tokenisation, images. What is specific to a model family (its chat
templates, image preprocessing, where its layers are) comes from its backbone
(``cl_bench.models.backbones``); the name of this module is historical.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from PIL import Image

from cl_bench.config import ModelConfig
from cl_bench.errors import CLBenchError
from cl_bench.models.backbones import Backbone, Conversation, backbone_of, get_backbone
from cl_bench.models.placement import (
    is_low_precision,
    keep_float32,
    resolve_device,
    resolve_dtype,
)
from tasks.images import open_rgb

IGNORE_INDEX = -100
ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2")


@dataclass
class ModelBundle:
    """A model with its processor (tokenizer + image processor) and how prompts are made.

    ``conversation`` and ``image_aspect_ratio`` default to the folder's own format (llava-hf's
    ``USER: <image>\\n... ASSISTANT:`` prompt, the processor's resize and crop); a run sets them
    from ``model.conversation`` and ``model.image_aspect_ratio``.
    """

    model: torch.nn.Module
    processor: object
    path: Path
    conversation: str = "llava_hf"
    image_aspect_ratio: str = "crop"

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @cached_property
    def backbone(self) -> Backbone:
        return backbone_of(self.model)

    @property
    def template(self) -> Conversation:
        return self.backbone.conversation(self.conversation)

    @cached_property
    def image_token_count(self) -> int:
        """Placeholder tokens one image expands to (576 for llava-1.5-7b-hf)."""
        text = self.backbone.image_text
        probe = Image.new("RGB", (8, 8))
        ids = self.processor(text=text, images=probe, return_tensors="pt")["input_ids"][0]
        return int((ids == self.image_token_id).sum())

    @property
    def image_token_id(self) -> int:
        return self.backbone.image_token_id(self.model)

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        """Images preprocessed as the backbone does, with the run's aspect-ratio policy."""
        return self.backbone.pixel_values(self.processor.image_processor, images,
                                          self.image_aspect_ratio)


def attention_implementation(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """``auto``: flash_attention_2 where it is installed and can run (CUDA, 16-bit), else sdpa."""
    if name not in ATTENTION:
        raise CLBenchError(f"model.attn_implementation={name!r}: expected one of {ATTENTION}")
    if name != "auto":
        return name
    flash = importlib.util.find_spec("flash_attn") is not None
    return "flash_attention_2" if flash and device.type == "cuda" and is_low_precision(dtype) \
        else "sdpa"


def load_llava(path: str | Path, settings: ModelConfig | None = None) -> ModelBundle:
    """Load a local model folder (e.g. ``llava-1.5-7b-hf``), placed and typed as ``settings``
    say (default: float32 on the CPU, the folder's own prompt format); never reaches a hub."""
    settings = settings or ModelConfig(device="cpu", dtype="fp32", attn_implementation="sdpa",
                                       conversation="llava_hf", image_aspect_ratio="crop")
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise CLBenchError(
            f"model folder {folder} has no config.json: expected a local Hugging Face LLaVA "
            "folder (config.json, weights, tokenizer and preprocessor files), e.g. llava-1.5-7b-hf"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    backbone = get_backbone(_model_type(folder))
    backbone.conversation(settings.conversation)
    backbone.check_aspect_ratio(settings.image_aspect_ratio)
    attention = attention_implementation(settings.attn_implementation, device, dtype)
    model, processor = backbone.load(folder, dtype, attention)
    model.requires_grad_(False)  # frozen: methods make trainable what they train
    if is_low_precision(dtype):
        keep_float32(backbone.projector(model))  # it trains, and carries full-size updates
    model.to(device)
    return ModelBundle(model, processor, folder, settings.conversation,
                       settings.image_aspect_ratio)


def _model_type(folder: Path) -> str:
    import json

    try:
        return str(json.loads((folder / "config.json").read_text())["model_type"])
    except (ValueError, KeyError) as err:
        raise CLBenchError(f"{folder / 'config.json'}: no model_type ({err})") from None


def user_prompt(question: str, image_tokens: int, first_turn: bool = True) -> str:
    """The ``llava_hf`` user turn as text (the micro world's tokenizer corpus uses it)."""
    image = "<image>" * image_tokens + "\n" if image_tokens and first_turn else ""
    return f"USER: {image}{question} ASSISTANT:"


def encode_turns(
    bundle: ModelBundle, turns: Sequence[tuple[str, str | None]], has_image: bool
) -> tuple[list[int], list[int]]:
    """Ids and labels of a conversation, tokenized as one text (as LLaVA-1.5 trains); labels
    keep the answers (and their EOS) only. A last answer of None makes a generation prompt.

    The image placeholder is tokenized once and expanded to the image's token count after.
    """
    tok = bundle.tokenizer
    image = bundle.backbone.image_text if has_image else None
    text, spans = bundle.template.render(turns, image, tok.eos_token)
    if not getattr(tok, "is_fast", True):
        raise CLBenchError(f"{bundle.path}: the tokenizer gives no character offsets; cl-bench "
                           "needs a fast (tokenizer.json) tokenizer to find the answer tokens")
    encoded = tok(text, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
    if tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
        ids, offsets = [tok.bos_token_id, *ids], [(0, 0), *offsets]
    labels = [
        i if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
        for i, (begin, _) in zip(ids, offsets, strict=True)
    ]
    if has_image:
        ids, labels = _expand_image(ids, labels, bundle.image_token_id, bundle.image_token_count)
    return ids, labels


def _expand_image(ids: list[int], labels: list[int], image_id: int, count: int
                  ) -> tuple[list[int], list[int]]:
    if ids.count(image_id) != 1:
        raise CLBenchError(f"expected one image placeholder in the prompt, found "
                           f"{ids.count(image_id)} (is the image token in the question text?)")
    at = ids.index(image_id)
    return (ids[:at] + [image_id] * count + ids[at + 1:],
            labels[:at] + [IGNORE_INDEX] * count + labels[at + 1:])


def encode_prompt(bundle: ModelBundle, question: str, has_image: bool) -> list[int]:
    """Token ids of a one-turn prompt ending where the answer starts."""
    return encode_turns(bundle, ((question, None),), has_image)[0]


def encode_conversation(
    bundle: ModelBundle, turns: tuple[tuple[str, str], ...], has_image: bool, max_length: int
) -> tuple[list[int], list[int]]:
    """Input ids and labels of a conversation, truncated to ``max_length`` tokens: text is cut,
    image tokens never (a cut through them is an error naming the length)."""
    ids, labels = encode_turns(bundle, turns, has_image)
    if len(ids) > max_length:
        if has_image and bundle.image_token_id in ids[max_length:]:
            raise CLBenchError(
                f"train.max_length {max_length} cuts through the {bundle.image_token_count} "
                "image tokens: raise it (LLaVA-1.5 trains with 2048)"
            )
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels


def load_image(path: Path) -> Image.Image:
    """The image as RGB, whatever its mode and bit depth (``tasks.images.to_rgb``)."""
    return open_rgb(path)
