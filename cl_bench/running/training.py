"""Training through the transformers Trainer, with the method's extra loss terms.

The Trainer places the model and each batch on its device (``cuda:LOCAL_RANK``, or the CPU
when the model is there) and runs the forward under autocast in the model's dtype. Gradient
accumulation keeps the loss of one effective batch whatever the split: the LLaVA loss is
normalised by the tokens of the whole accumulated batch (``num_items_in_batch``), the method's
extra terms (means over their own batch) by the number of micro-batches. Every ``save_steps``
optimizer steps a checkpoint (trainable parameters, optimizer, scheduler, RNG states and the
method's state) lets a killed stage resume where it stopped.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from cl_bench.config import TrainConfig
from cl_bench.errors import CLBenchError
from cl_bench.models.backbones import backbone_of
from cl_bench.models.batching import ConversationDataset, collate_batch
from cl_bench.models.llava import ModelBundle
from cl_bench.models.placement import compute_dtype, device_of
from tasks.loaders import Sample

ExtraLoss = Callable[[torch.nn.Module, dict, object], dict[str, torch.Tensor]]
BeforeBatch = Callable[[list[tuple[str, Image.Image | None]]], None]
ROW_PROMPTS = "row_prompts"  # the batch's (first question, image) rows, for ``before_batch``
TRAINABLE_FILE = "trainable.safetensors"
METHOD_STATE_FILE = "method_state.json"


@dataclass
class MethodState:
    """How a Trainer checkpoint saves and restores the method's own state mid-stage."""

    state: Callable[[], dict]
    load_state: Callable[[dict], None]


class MethodTrainer(Trainer):
    """A Trainer whose loss is the LLaVA loss plus the method's extra terms (``before_batch`` sees
    each batch's rows before its forward), with a separate projector learning rate and checkpoints
    holding only what trains."""

    def __init__(self, *args, extra_loss: ExtraLoss | None = None,
                 before_batch: BeforeBatch | None = None, projector_lr: float | None = None,
                 method_state: MethodState | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.extra_loss = extra_loss
        self.before_batch = before_batch
        self.projector_lr = projector_lr
        self.method_state = method_state
        self.loss_parts: dict[str, float] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rows = inputs.pop(ROW_PROMPTS, None)
        if self.before_batch is not None:
            if rows is None:
                raise CLBenchError("a before_batch hook needs batches from collate_training")
            self.before_batch(rows)
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        if self.extra_loss is not None:
            share = self._extra_share(num_items_in_batch)
            for name, term in self.extra_loss(model, inputs, outputs).items():
                loss = loss + share * term
                self.loss_parts[name] = float(term.detach())
        return (loss, outputs) if return_outputs else loss

    def _extra_share(self, num_items_in_batch) -> float:
        """The weight of a micro-batch's extra terms. When the LLaVA loss is normalised by the
        tokens of the whole accumulated batch, the Trainer no longer divides the loss by the
        accumulation steps, so the extra terms (per-micro-batch means) are divided here."""
        normalised = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        if not (normalised and self.model.training):
            return 1.0
        return 1.0 / getattr(self, "current_gradient_accumulation_steps", 1)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        lr = self.projector_lr
        if lr is None or lr == self.args.learning_rate:
            return optimizer
        opt_model = self.model if model is None else model
        projector = {id(p) for p in backbone_of(opt_model).projector(opt_model).parameters()}
        for group in list(optimizer.param_groups):
            moved = [p for p in group["params"] if id(p) in projector]
            if moved:
                group["params"] = [p for p in group["params"] if id(p) not in projector]
                optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"},
                                           "params": moved, "lr": lr})
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
        return optimizer

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """A checkpoint holds the trainable parameters (LoRA, projector) and the method's state,
        never the frozen model."""
        if not self.args.should_save:
            return
        folder = Path(output_dir or self.args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        trainable = {n: p.detach().cpu().contiguous()
                     for n, p in self.model.named_parameters() if p.requires_grad}
        save_file(trainable, str(folder / TRAINABLE_FILE))
        if self.method_state is not None:
            (folder / METHOD_STATE_FILE).write_text(json.dumps(self.method_state.state()))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        folder = Path(resume_from_checkpoint)
        if not (folder / TRAINABLE_FILE).is_file():
            raise CLBenchError(f"{folder} is no cl-bench training checkpoint ({TRAINABLE_FILE} "
                               "missing): delete it to train the stage from its start")
        params = dict((model or self.model).named_parameters())
        with torch.no_grad():
            for name, value in load_file(str(folder / TRAINABLE_FILE)).items():
                if name not in params:
                    raise CLBenchError(f"{folder}: parameter {name} is not in the model")
                params[name].copy_(value)
        state_file = folder / METHOD_STATE_FILE
        if self.method_state is not None and state_file.is_file():
            self.method_state.load_state(json.loads(state_file.read_text()))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def accumulation_steps(cfg: TrainConfig, processes: int | None = None) -> int:
    """Gradient accumulation making ``global_batch_size`` from ``batch_size`` per device."""
    processes = processes or world_size()
    if cfg.global_batch_size is None:
        return 1
    per_step = cfg.batch_size * processes
    if cfg.global_batch_size < per_step or cfg.global_batch_size % per_step:
        raise CLBenchError(
            f"train.global_batch_size {cfg.global_batch_size} is not a multiple of "
            f"train.batch_size {cfg.batch_size} x {processes} process(es)"
        )
    return cfg.global_batch_size // per_step


def training_arguments(cfg: TrainConfig, output_dir: Path, seed: int,
                       model: torch.nn.Module | None = None,
                       report_to: list[str] | None = None) -> TrainingArguments:
    """The recipe mapped onto TrainingArguments; autocast follows the model's dtype and the
    Trainer's device the model's (the CPU stays the CPU even where a GPU is present);
    ``report_to``: the Trainer's own tracker integrations (none by default)."""
    dtype = compute_dtype(model) if model is not None else torch.float32
    # runs place models on cpu or cuda (placement.resolve_device): the Trainer follows
    on_cpu = model is not None and device_of(model).type != "cuda"
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=accumulation_steps(cfg),
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # below 1: a ratio of the total steps (transformers 5)
        weight_decay=cfg.weight_decay,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        activation_checkpointing=cfg.gradient_checkpointing,
        deepspeed=cfg.deepspeed,
        logging_steps=10,
        save_strategy="steps" if cfg.save_steps > 0 else "no",
        save_steps=max(cfg.save_steps, 1),
        save_total_limit=1,
        report_to=list(report_to or []),
        seed=seed,
        data_seed=seed,
        remove_unused_columns=False,
        dataloader_num_workers=cfg.dataloader_workers,
        dataloader_pin_memory=not on_cpu,
        use_cpu=on_cpu,
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
    method_state: MethodState | None = None,
    report_to: list[str] | None = None,
) -> dict[str, float]:
    """Train ``model`` in place on ``samples``; returns the final training metrics.

    With ``cfg.save_steps`` the Trainer checkpoints into ``output_dir`` and a later call on the
    same folder resumes from its last checkpoint (the caller removes the folder once the stage
    is kept).
    """
    if cfg.limit is not None:
        samples = random.Random(seed).sample(samples, min(cfg.limit, len(samples)))
    trainer = MethodTrainer(
        model=model,
        args=training_arguments(cfg, output_dir, seed, model, report_to),
        train_dataset=ConversationDataset(samples, bundle, cfg.max_length),
        data_collator=lambda items: collate_training(items, bundle),
        extra_loss=extra_loss,
        before_batch=before_batch,
        projector_lr=cfg.projector_lr,
        method_state=method_state,
    )
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    result = trainer.train(resume_from_checkpoint=last)
    info = {"train_loss": float(result.training_loss), **trainer.loss_parts}
    if last is not None:  # the Trainer averages the loss over the steps after the resume
        info["resumed_from_step"] = int(Path(last).name.rpartition("-")[2])
    return info
