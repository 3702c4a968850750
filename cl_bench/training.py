"""Training through the transformers Trainer, with the method's extra loss terms."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from cl_bench.config import TrainConfig
from cl_bench.models import (
    IGNORE_INDEX,
    ModelBundle,
    encode_conversation,
    encode_prompt,
    load_image,
)
from tasks.images import to_rgb
from tasks.loaders import Sample

ExtraLoss = Callable[[torch.nn.Module, dict, object], dict[str, torch.Tensor]]


class ConversationDataset(Dataset):
    """Samples encoded on access: ids, labels and the image (if any)."""

    def __init__(self, samples: list[Sample], bundle: ModelBundle, max_length: int) -> None:
        self.samples, self.bundle, self.max_length = samples, bundle, max_length

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        sample = self.samples[i]
        has_image = sample.image is not None
        ids, labels = encode_conversation(self.bundle, sample.turns, has_image, self.max_length)
        image = load_image(sample.image) if has_image else None
        return {"ids": ids, "labels": labels, "image": image}


def prompt_item(bundle: ModelBundle, question: str, image: Path | Image.Image | None) -> dict:
    """A one-turn prompt for ``collate_batch``: its ids and its image (a path is loaded)."""
    if isinstance(image, Path):
        image = load_image(image)
    elif image is not None:
        image = to_rgb(image)
    return {"ids": encode_prompt(bundle, question, image is not None), "image": image}


def collate_batch(items: list[dict], bundle: ModelBundle, left_pad: bool = False) -> dict:
    """Pad a batch (right for training, left for generation) and stack its images."""
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
        batch["pixel_values"] = bundle.processor.image_processor(
            images, return_tensors="pt"
        )["pixel_values"]
    return batch


class MethodTrainer(Trainer):
    """A Trainer whose loss is the LLaVA loss plus the method's extra terms."""

    def __init__(self, *args, extra_loss: ExtraLoss | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.extra_loss = extra_loss
        self.loss_parts: dict[str, float] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = outputs.loss
        if self.extra_loss is not None:
            for name, term in self.extra_loss(model, inputs, outputs).items():
                loss = loss + term
                self.loss_parts[name] = float(term.detach())
        return (loss, outputs) if return_outputs else loss


def training_arguments(cfg: TrainConfig, output_dir: Path, seed: int) -> TrainingArguments:
    """The paper's hyperparameters mapped onto TrainingArguments."""
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        bf16=cfg.bf16,
        activation_checkpointing=cfg.gradient_checkpointing,
        deepspeed=cfg.deepspeed,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


def train_model(
    model: torch.nn.Module,
    bundle: ModelBundle,
    samples: list[Sample],
    cfg: TrainConfig,
    output_dir: Path,
    seed: int,
    extra_loss: ExtraLoss | None = None,
) -> dict[str, float]:
    """Train ``model`` in place on ``samples``; returns the final training metrics."""
    if cfg.limit is not None:
        samples = random.Random(seed).sample(samples, min(cfg.limit, len(samples)))
    trainer = MethodTrainer(
        model=model,
        args=training_arguments(cfg, output_dir, seed),
        train_dataset=ConversationDataset(samples, bundle, cfg.max_length),
        data_collator=lambda items: collate_batch(items, bundle),
        extra_loss=extra_loss,
    )
    result = trainer.train()
    return {"train_loss": float(result.training_loss), **trainer.loss_parts}
