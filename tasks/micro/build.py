"""The base build's training phases, in LLaVA-1.5's order at micro scale.

1. a byte-level BPE tokenizer on all the world's text;
2. a tiny CLIP trained contrastively on image-caption pairs naming every visual concept;
3. the tiny language model trained on text-only conversations (the Vicuna analogue);
4. alignment: only the projector trained on brief captions, vision tower and language model
   frozen (LLaVA's stage 1); this model is saved as ``aligned/``;
5. instruction tuning: language model and projector trained on the general mix, vision tower
   frozen (LLaVA's stage 2); this model is saved as ``llava/``, the base of ``ucit-micro``.
"""

from __future__ import annotations

import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cl_bench.config import TrainConfig
from cl_bench.models.llava import ModelBundle, load_image, user_prompt
from cl_bench.models.lora import projector
from cl_bench.running.training import train_model
from tasks.loaders import Sample, load_samples, read_records
from tasks.micro.model import (
    TinyConfig,
    build_clip,
    build_llava,
    image_processor,
    llava_processor,
    save_llava,
    train_tokenizer,
)
from tasks.micro.world import MicroWorldConfig


@dataclass(frozen=True)
class Phase:
    """One training phase of the LLaVA model: steps, batch size and learning rate."""

    steps: int
    batch: int = 32
    lr: float = 1e-3

    def train_config(self) -> TrainConfig:
        return TrainConfig(learning_rate=self.lr, batch_size=self.batch, max_steps=self.steps,
                           warmup_ratio=0.03, max_length=160)


@dataclass(frozen=True)
class BaseBuildConfig:
    """Everything that determines the base model; its hash is the cache key."""

    tiny: TinyConfig = field(default_factory=TinyConfig)
    world: MicroWorldConfig = field(default_factory=MicroWorldConfig)
    seed: int = 0
    clip_steps: int = 600
    clip_batch: int = 128
    clip_lr: float = 1e-3
    chat: Phase = field(default_factory=lambda: Phase(300))
    align: Phase = field(default_factory=lambda: Phase(300))
    tune: Phase = field(default_factory=lambda: Phase(1500))

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> BaseBuildConfig:
        """The inverse of ``as_dict``."""
        nested = {"tiny": TinyConfig, "world": MicroWorldConfig, "chat": Phase, "align": Phase,
                  "tune": Phase}
        return cls(**{k: nested[k](**v) if k in nested else v for k, v in data.items()})


def log(message: str) -> None:
    print(f"[clbench base] {message}", file=sys.stderr, flush=True)


def corpus(data: Path) -> list[str]:
    """All text of the micro world plus the prompt template, for the tokenizer."""
    texts = [user_prompt("", 0)]
    for path in sorted(data.rglob("*.json")):
        if path.name == "manifest.json":
            continue
        for rec in read_records(path):
            texts += [str(c.get("value", "")) for c in rec.get("conversations", [])]
            texts += [str(rec[k]) for k in ("text", "answer", "caption") if k in rec]
    return texts


def build_base(data: Path, out: Path, build: BaseBuildConfig) -> dict[str, float]:
    """Run every phase; writes ``clip/``, ``aligned/`` and ``llava/`` under ``out``. Returns the
    seconds each phase took."""
    started = time.time()
    seconds = {}
    torch.manual_seed(build.seed)
    log("training the tokenizer")
    tokenizer = train_tokenizer(corpus(data), build.tiny.vocab_size)
    clip = build_clip(build.tiny, tokenizer)
    log("training the tiny CLIP")
    train_clip(clip, tokenizer, read_records(data / "pretrain" / "clip.json"),
               data / "pretrain", build)
    clip.save_pretrained(out / "clip")
    tokenizer.save_pretrained(out / "clip")
    image_processor(build.tiny).save_pretrained(out / "clip")
    seconds["tokenizer+clip"] = round(time.time() - started, 1)

    llava = build_llava(build.tiny, tokenizer)
    llava.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    processor = llava_processor(build.tiny, tokenizer)
    bundle = ModelBundle(llava, processor, out / "llava")
    pretrain = data / "pretrain"
    phases = (
        ("language model on text chat", "chat", build.chat, "language_model",
         load_samples(pretrain / "text.json", pretrain)),
        ("projector alignment on brief captions", "align", build.align, "projector",
         load_samples(pretrain / "align.json", pretrain)),
        ("instruction tuning on the general mix", "tune", build.tune, "language_model+projector",
         load_samples(data / "general" / "train.json", data / "general")),
    )
    for what, name, phase, trainable, samples in phases:
        log(f"{what}: {phase.steps} steps on {len(samples)} samples")
        started = time.time()
        set_trainable(llava, trainable)
        train_phase(llava, bundle, samples, phase, out / "trainer", build.seed)
        if name == "align":
            save_llava(llava, processor, out / "aligned")
        seconds[name] = round(time.time() - started, 1)
    save_llava(llava, processor, out / "llava")
    return seconds


def set_trainable(llava, parts: str) -> None:
    """Train only ``parts`` ("language_model", "projector" or both joined by "+")."""
    llava.requires_grad_(False)
    for part in parts.split("+"):
        module = projector(llava) if part == "projector" else llava.model.language_model
        module.requires_grad_(True)
    if "language_model" in parts:
        llava.lm_head.requires_grad_(True)


def train_phase(llava, bundle: ModelBundle, samples: list[Sample], phase: Phase, scratch: Path,
                seed: int) -> None:
    train_model(llava, bundle, samples, phase.train_config(), scratch, seed)
    shutil.rmtree(scratch, ignore_errors=True)


def train_clip(clip, tokenizer, records: list[dict], image_root: Path,
               build: BaseBuildConfig) -> None:
    """Contrastive image-text training (CLIP's symmetric InfoNCE) on image-caption pairs."""
    rng = random.Random(build.seed)
    processor = image_processor(build.tiny)
    images = [load_image(image_root / r["image"]) for r in records]
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    texts = [str(r["caption"]) + tokenizer.eos_token for r in records]
    optimizer = torch.optim.AdamW(clip.parameters(), lr=build.clip_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, build.clip_lr, total_steps=build.clip_steps, pct_start=0.05
    )
    clip.train()
    bar = tqdm(range(build.clip_steps), desc="tiny CLIP", leave=False)
    for _ in bar:
        idx = rng.sample(range(len(records)), min(build.clip_batch, len(records)))
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=77,
                        add_special_tokens=False, return_tensors="pt")
        out = clip(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                   pixel_values=pixels[idx], return_loss=True)
        out.loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{out.loss.item():.3f}")
    clip.eval()
