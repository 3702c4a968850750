"""Training through the transformers Trainer, with the method's extra loss terms."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from transformers import Trainer, TrainingArguments

from cl_bench.config import TrainConfig
from cl_bench.models.batching import ConversationDataset, collate_batch
from cl_bench.models.llava import ModelBundle
from tasks.loaders import Sample

ExtraLoss = Callable[[torch.nn.Module, dict, object], dict[str, torch.Tensor]]
BeforeBatch = Callable[[list[tuple[str, Image.Image | None]]], None]
BeforeStep = Callable[[], None]
ROW_PROMPTS = "row_prompts"  # the batch's (first question, image) rows, for ``before_batch``


class MethodTrainer(Trainer):
    """A Trainer whose loss is the LLaVA loss plus the method's extra terms; ``before_batch``
    sees each batch's rows before its forward, ``before_step`` the gradients of each optimizer
    step before clipping and the step."""

    def __init__(self, *args, extra_loss: ExtraLoss | None = None,
                 before_batch: BeforeBatch | None = None, before_step: BeforeStep | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.extra_loss = extra_loss
        self.before_batch = before_batch
        self.before_step = before_step
        self.loss_parts: dict[str, float] = {}

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.before_step is not None and self.accelerator.sync_gradients:
            with self.compute_loss_context_manager():  # the training's autocast
                self.before_step()  # the step's last micro-batch: clipping and the step follow
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rows = inputs.pop(ROW_PROMPTS)
        if self.before_batch is not None:
            self.before_batch(rows)
        outputs = model(**inputs)
        loss = outputs.loss
        if self.extra_loss is not None:
            for name, term in self.extra_loss(model, inputs, outputs).items():
                loss = loss + term
                self.loss_parts[name] = float(term.detach())
        return (loss, outputs) if return_outputs else loss


def training_arguments(
    cfg: TrainConfig, output_dir: Path, seed: int, report_to: list[str] | None = None
) -> TrainingArguments:
    """The paper's hyperparameters mapped onto TrainingArguments; ``report_to``: the Trainer's
    own tracker integrations (none by default)."""
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
        report_to=list(report_to or []),
        seed=seed,
        data_seed=seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


def collate_training(items: list[dict], bundle: ModelBundle) -> dict:
    """A right-padded training batch with its rows' (first question, image) for hooks."""
    batch = collate_batch(items, bundle)
    batch[ROW_PROMPTS] = [(item["question"], item["image"]) for item in items]
    return batch


def train_model(
    model: torch.nn.Module,
    bundle: ModelBundle,
    samples: list[Sample],
    cfg: TrainConfig,
    output_dir: Path,
    seed: int,
    extra_loss: ExtraLoss | None = None,
    before_batch: BeforeBatch | None = None,
    report_to: list[str] | None = None,
    before_step: BeforeStep | None = None,
) -> dict[str, float]:
    """Train ``model`` in place on ``samples``; returns the final training metrics."""
    if cfg.limit is not None:
        samples = random.Random(seed).sample(samples, min(cfg.limit, len(samples)))
    trainer = MethodTrainer(
        model=model,
        args=training_arguments(cfg, output_dir, seed, report_to),
        train_dataset=ConversationDataset(samples, bundle, cfg.max_length),
        data_collator=lambda items: collate_training(items, bundle),
        extra_loss=extra_loss,
        before_batch=before_batch,
        before_step=before_step,
    )
    result = trainer.train()
    return {"train_loss": float(result.training_loss), **trainer.loss_parts}
