"""Local Hugging Face LLaVA folders: loading, prompts and tokenisation, images."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from cl_bench.errors import CLBenchError
from tasks.images import open_rgb

IGNORE_INDEX = -100


@dataclass
class ModelBundle:
    """A LLaVA model with its processor (tokenizer + image processor)."""

    model: torch.nn.Module
    processor: object
    path: Path

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @cached_property
    def image_token_count(self) -> int:
        """Placeholder tokens one image expands to (576 for llava-1.5-7b-hf)."""
        probe = Image.new("RGB", (8, 8))
        ids = self.processor(text="<image>", images=probe, return_tensors="pt")["input_ids"][0]
        return int((ids == self.image_token_id).sum())

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_index


def load_llava(path: str | Path, dtype: torch.dtype = torch.float32) -> ModelBundle:
    """Load a local LLaVA folder (the ``llava-1.5-7b-hf`` layout); never reaches a hub."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise CLBenchError(
            f"model folder {folder} has no config.json: expected a local Hugging Face LLaVA "
            "folder (config.json, weights, tokenizer and preprocessor files), e.g. llava-1.5-7b-hf"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = LlavaForConditionalGeneration.from_pretrained(
        folder, dtype=dtype, local_files_only=True
    )
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    return ModelBundle(model, processor, folder)


def user_prompt(question: str, image_tokens: int, first_turn: bool = True) -> str:
    """The LLaVA-1.5 (Vicuna v1) user turn, as llava-1.5-hf's chat template writes it."""
    image = "<image>" * image_tokens + "\n" if image_tokens and first_turn else ""
    return f"USER: {image}{question} ASSISTANT:"


def encode_prompt(bundle: ModelBundle, question: str, has_image: bool) -> list[int]:
    """Token ids of a one-turn prompt ending where the answer starts."""
    tok = bundle.tokenizer
    text = user_prompt(question, bundle.image_token_count if has_image else 0)
    return [tok.bos_token_id, *tok(text, add_special_tokens=False).input_ids]


def encode_conversation(
    bundle: ModelBundle, turns: tuple[tuple[str, str], ...], has_image: bool, max_length: int
) -> tuple[list[int], list[int]]:
    """Input ids and labels of a conversation; only the answers are supervised."""
    tok = bundle.tokenizer
    ids, labels = [tok.bos_token_id], [IGNORE_INDEX]
    for i, (question, answer) in enumerate(turns):
        n_image = bundle.image_token_count if has_image else 0
        prompt = tok(user_prompt(question, n_image, i == 0), add_special_tokens=False).input_ids
        reply = [*tok(" " + answer, add_special_tokens=False).input_ids, tok.eos_token_id]
        ids += prompt + reply
        labels += [IGNORE_INDEX] * len(prompt) + reply
    if len(ids) > max_length:
        if has_image and ids[max_length - 1] == bundle.image_token_id:
            raise CLBenchError(f"max_length {max_length} cuts through the image tokens")
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels


def load_image(path: Path) -> Image.Image:
    """The image as RGB, whatever its mode and bit depth (``tasks.images.to_rgb``)."""
    return open_rgb(path)
