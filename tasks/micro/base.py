"""The micro world's base model: a tiny CLIP trained contrastively, then a tiny LLaVA built on
its vision tower and trained on the general instruction mix. Built once, cached by config."""

from __future__ import annotations

import hashlib
import json
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
from cl_bench.running.training import train_model
from tasks.loaders import load_samples, read_records
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
from tasks.micro.write import generate_micro_world

FORMAT_VERSION = 2


@dataclass(frozen=True)
class BaseBuildConfig:
    """Everything that determines the base model; its hash is the cache key."""

    tiny: TinyConfig = field(default_factory=TinyConfig)
    world: MicroWorldConfig = field(default_factory=MicroWorldConfig)
    seed: int = 0
    clip_steps: int = 400
    clip_batch: int = 128
    clip_lr: float = 1e-3
    llava_steps: int = 1800
    llava_batch: int = 32
    llava_lr: float = 1e-3

    def fingerprint(self) -> str:
        parts = [FORMAT_VERSION, self.world.fingerprint(), asdict(self)]
        text = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def micro_data_root(cache: Path, world: MicroWorldConfig | None = None) -> Path:
    """The generated micro world (generated on first use, then cached)."""
    return generate_micro_world(cache / "micro-data", world or MicroWorldConfig(), progress=True)


def micro_base_model(
    cache: Path, force: bool = False, build: BaseBuildConfig | None = None
) -> Path:
    """The cached base LLaVA folder, built if missing (or if ``force``)."""
    build = build or BaseBuildConfig()
    folder = cache / "micro-base" / build.fingerprint()
    if (folder / "llava" / "config.json").exists() and not force:
        return folder / "llava"
    if folder.exists():
        shutil.rmtree(folder)
    started = time.time()
    data = micro_data_root(cache, build.world)
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    build_base(data, staging, build)
    (staging / "build.json").write_text(
        json.dumps({"config": asdict(build), "seconds": round(time.time() - started, 1)},
                   indent=2, default=str)
    )
    staging.rename(folder)
    return folder / "llava"


def micro_clip_model(cache: Path, build: BaseBuildConfig | None = None) -> Path:
    """The tiny CLIP folder of the base build (its text tower gives HiDe's text anchors)."""
    return micro_base_model(cache, build=build).parent / "clip"


def _log(message: str) -> None:
    print(f"[clbench base] {message}", file=sys.stderr, flush=True)


def corpus(data: Path) -> list[str]:
    """All text of the micro world plus the prompt template, for the tokenizer."""
    texts = [user_prompt("", 0)]
    for path in sorted(data.rglob("*.json")):
        if path.name == "manifest.json":
            continue
        for rec in read_records(path):
            texts += [str(c.get("value", "")) for c in rec.get("conversations", [])]
            texts += [str(rec.get(k, "")) for k in ("text", "answer") if k in rec]
    return texts


def build_base(data: Path, out: Path, build: BaseBuildConfig) -> None:
    """Tokenizer -> CLIP (contrastive) -> LLaVA on the CLIP vision tower -> general mix."""
    torch.manual_seed(build.seed)
    _log("training the tokenizer")
    tokenizer = train_tokenizer(corpus(data), build.tiny.vocab_size)
    general = load_samples(data / "general" / "train.json", data / "general")
    clip = build_clip(build.tiny, tokenizer)
    train_clip(clip, tokenizer, [s for s in general if s.image is not None], build)
    clip_dir = out / "clip"
    clip.save_pretrained(clip_dir)
    tokenizer.save_pretrained(clip_dir)
    image_processor(build.tiny).save_pretrained(clip_dir)

    llava = build_llava(build.tiny, tokenizer)
    llava.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    llava.model.vision_tower.requires_grad_(False)  # frozen, as LLaVA-1.5 keeps CLIP
    processor = llava_processor(build.tiny, tokenizer)
    bundle = ModelBundle(llava, processor, out / "llava")
    _log(f"training the tiny LLaVA on {len(general)} general-mix samples")
    train = TrainConfig(
        learning_rate=build.llava_lr, batch_size=build.llava_batch, max_steps=build.llava_steps,
        warmup_ratio=0.03, max_length=128,
    )
    train_model(llava, bundle, general, train, out / "trainer", build.seed)
    shutil.rmtree(out / "trainer", ignore_errors=True)
    save_llava(llava, processor, out / "llava")


def train_clip(clip, tokenizer, samples: list, build: BaseBuildConfig) -> None:
    """Contrastive image-text training on (image, caption) pairs (the answer if no caption)."""
    rng = random.Random(build.seed)
    processor = image_processor(build.tiny)
    pixels = processor([load_image(s.image) for s in samples], return_tensors="pt")["pixel_values"]
    texts = [s.extra.get("caption", s.answer) + tokenizer.eos_token for s in samples]
    optimizer = torch.optim.AdamW(clip.parameters(), lr=build.clip_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, build.clip_lr, total_steps=build.clip_steps, pct_start=0.05
    )
    clip.train()
    bar = tqdm(range(build.clip_steps), desc="tiny CLIP", leave=False)
    for _ in bar:
        idx = rng.sample(range(len(samples)), min(build.clip_batch, len(samples)))
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
