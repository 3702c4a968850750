"""Training: gradient accumulation keeps the loss and gradients of one effective batch, the
projector has its own learning rate, and the recipe maps onto TrainingArguments."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from method_kit import model_settings
from transformers import TrainerCallback

from cl_bench.config import LoraSettings, TrainConfig
from cl_bench.errors import CLBenchError
from cl_bench.models.batching import ConversationDataset, collate_batch
from cl_bench.models.llava import load_llava
from cl_bench.models.lora import add_lora, projector
from cl_bench.running.training import (
    MethodTrainer,
    batch_split,
    training_arguments,
)
from tasks.loaders import load_samples


class Gradients(TrainerCallback):
    """The trainable parameters' gradients just before the (first) optimizer step."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                      if p.requires_grad and p.grad is not None}


def lora_norm(model, inputs, outputs) -> dict[str, torch.Tensor]:
    """An extra loss term independent of the batch: each micro-batch's must count 1/GA."""
    return {"reg": sum(p.pow(2).sum() for n, p in model.named_parameters() if "lora_B" in n)}


def one_step(tiny_llava: Path, samples, batch: int, extra=None, projector_lr=None):
    bundle = load_llava(tiny_llava)
    torch.manual_seed(0)
    model = add_lora(bundle.model, LoraSettings(rank=2, alpha=4.0, dropout=0.0))
    with torch.no_grad():  # non-zero B, so that A has gradients too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    cfg = TrainConfig(batch_size=batch, global_batch_size=4, max_steps=1, learning_rate=1e-3,
                      projector_lr=projector_lr, warmup_ratio=0.0)
    grads = Gradients()
    trainer = MethodTrainer(
        model=model, args=training_arguments(cfg, Path("unused"), 0, model),
        train_dataset=ConversationDataset(samples, bundle, cfg.max_length),
        data_collator=lambda items: collate_batch(items, bundle), extra_loss=extra,
        projector_lr=cfg.projector_lr, callbacks=[grads],
    )
    loss = trainer.train().training_loss
    return loss, grads.grads, trainer


@pytest.fixture(scope="module")
def mixed_samples(ucit_root: Path):
    """Four samples with answers of different token counts (words and captions)."""
    root = ucit_root / "UCIT"
    words = load_samples(root / "ImageNet-R" / "train.json", root / "datasets")[:2]
    captions = load_samples(root / "VizWiz-caption" / "train.json", root / "datasets")[:2]
    return [words[0], captions[0], words[1], captions[1]]


@pytest.mark.parametrize("extra", [None, lora_norm], ids=["llava-loss", "with-extra-loss"])
def test_accumulation_keeps_the_loss_and_gradients_of_the_effective_batch(
    tiny_llava, mixed_samples, extra
) -> None:
    loss, grads, _ = one_step(tiny_llava, mixed_samples, 4, extra)
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    for batch in (2, 1):  # accumulation 2 and 4
        got_loss, got, _ = one_step(tiny_llava, mixed_samples, batch, extra)
        assert got_loss == pytest.approx(loss, rel=1e-4)
        for name, grad in grads.items():
            assert torch.allclose(got[name], grad, rtol=1e-3, atol=1e-6), name


def test_the_projector_trains_at_its_own_rate(tiny_llava, mixed_samples) -> None:
    _, _, trainer = one_step(tiny_llava, mixed_samples, 4, projector_lr=2e-5)
    proj = {id(p) for p in projector(trainer.model).parameters()}
    rates = {}
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            rates[id(p)] = group["initial_lr"]
    assert {rates[i] for i in proj} == {2e-5}
    assert {r for i, r in rates.items() if i not in proj} == {1e-3}
    assert len(rates) == sum(p.requires_grad for p in trainer.model.parameters())


def test_the_global_batch_stays_whatever_the_number_of_processes() -> None:
    cfg = TrainConfig(batch_size=8, global_batch_size=24)
    for processes, split in ((1, (8, 3)), (2, (6, 2)), (3, (8, 1)), (8, (3, 1))):
        assert batch_split(cfg, processes) == split
        assert split[0] * split[1] * processes == 24
    assert batch_split(TrainConfig(batch_size=8, global_batch_size=128), 8) == (8, 2)
    assert batch_split(TrainConfig(batch_size=16), 2) == (8, 1)  # the global batch: 16
    with pytest.raises(CLBenchError, match="global batch 24 .* does not split evenly over 5"):
        batch_split(cfg, 5)


def test_training_arguments_follow_the_model(tiny_llava) -> None:
    cfg = TrainConfig(warmup_ratio=0.03, gradient_checkpointing=True, dataloader_workers=3,
                      save_steps=50, batch_size=4, global_batch_size=12)
    for dtype, bf16 in (("bf16", True), ("fp32", False)):
        model = load_llava(tiny_llava, model_settings(dtype)).model
        args = training_arguments(cfg, Path("out"), 0, model)
        assert (args.bf16, args.fp16, args.use_cpu) == (bf16, False, True)
    assert args.gradient_accumulation_steps == 3 and args.warmup_steps == 0.03
    assert args.activation_checkpointing and args.dataloader_num_workers == 3
    assert (args.save_strategy, args.save_steps, args.save_total_limit) == ("steps", 50, 1)
