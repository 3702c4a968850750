"""Batches for the model: encoded conversations for training, prompts for generation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from cl_bench.models.llava import (
    IGNORE_INDEX,
    ModelBundle,
    encode_conversation,
    encode_prompt,
    load_image,
)
from tasks.images import to_rgb
from tasks.loaders import Sample


class ConversationDataset(Dataset):
    """Samples encoded on access: ids, labels, the image (if any) and the first question."""

    def __init__(self, samples: list[Sample], bundle: ModelBundle, max_length: int) -> None:
        self.samples, self.bundle, self.max_length = samples, bundle, max_length

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        sample = self.samples[i]
        has_image = sample.image is not None
        ids, labels = encode_conversation(self.bundle, sample.turns, has_image, self.max_length)
        image = load_image(sample.image) if has_image else None
        return {"ids": ids, "labels": labels, "image": image, "question": sample.question}


def prompt_item(bundle: ModelBundle, question: str, image: Path | Image.Image | None) -> dict:
    """A one-turn prompt for ``collate_batch``: its ids and its image (a path is loaded)."""
    if isinstance(image, Path):
        image = load_image(image)
    elif image is not None:
        image = to_rgb(image)
    return {"ids": encode_prompt(bundle, question, image is not None), "image": image}


def collate_batch(items: list[dict], bundle: ModelBundle, left_pad: bool = False) -> dict:
    """Pad a batch (right for training, left for generation) and stack its images, on the CPU
    (``placement.to_model`` moves it to the model's device)."""
    pad = bundle.tokenizer.pad_token_id
    width = max(len(item["ids"]) for item in items)
    input_ids = torch.full((len(items), width), pad, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["ids"])
        span = slice(width - n, width) if left_pad else slice(0, n)
        input_ids[row, span] = torch.tensor(item["ids"])
        mask[row, span] = 1
        if "labels" in item:
            labels[row, span] = torch.tensor(item["labels"])
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if any("labels" in item for item in items):
        batch["labels"] = labels
    images = [item["image"] for item in items if item["image"] is not None]
    if images:
        batch["pixel_values"] = bundle.pixel_values(images)
    return batch


def training_batches(
    samples: list[Sample], bundle: ModelBundle, batch_size: int, max_length: int,
    device: torch.device,
) -> Iterator[dict]:
    """Training batches (ids, labels, images) of ``samples`` in order, moved to ``device``."""
    data = ConversationDataset(samples, bundle, max_length)
    for start in range(0, len(samples), batch_size):
        items = [data[i] for i in range(start, min(start + batch_size, len(samples)))]
        yield {key: value.to(device) for key, value in collate_batch(items, bundle).items()}
