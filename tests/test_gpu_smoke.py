"""Smoke test of the single-GPU path: two stages of finetune, llava_c and hide_llava in bfloat16.

``7b`` (marked ``gpu``, skipped without CUDA): a LLaVA with llava-1.5-7b's shapes but two decoder
layers (hidden 4096, MLP 11008, 32 heads, vocabulary 32064; CLIP ViT-L/14-336 geometry with two
layers: 576 image tokens) and a Llama tokenizer built here, run on ``cuda``; it checks where
every parameter lives and in which dtype, the peak GPU memory, and a finite matrix. ``tiny``: the
same body at the test fixtures' size on the CPU, in bfloat16, so that CI runs this path too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import TINY, llama_tokenizer
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

import cl_bench.running.runner
from cl_bench.cli import main
from cl_bench.models.backbones import backbone_of
from cl_bench.models.placement import device_of
from tasks.micro.model import image_processor, vision_config


@dataclass(frozen=True)
class Shapes:
    """The sizes of the smoke model (``llava_7b``: llava-1.5-7b's, two decoder layers)."""

    hidden: int
    intermediate: int
    heads: int
    layers: int
    vocab: int
    vision: CLIPVisionConfig
    text_clip: CLIPTextConfig


def llava_7b(tokenizer) -> Shapes:
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=2,
                              num_attention_heads=16, image_size=336, patch_size=14,
                              projection_dim=768)
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                          num_hidden_layers=2, num_attention_heads=12, projection_dim=768,
                          max_position_embeddings=77, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    return Shapes(4096, 11008, 32, 2, 32064, vision, text)


def tiny(tokenizer) -> Shapes:
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=TINY.projection_dim,
                          intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          projection_dim=TINY.projection_dim, max_position_embeddings=77,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return Shapes(TINY.text_hidden, TINY.intermediate, TINY.heads, TINY.text_layers,
                  len(tokenizer), vision_config(TINY), text)


def clip_processor(size: int):
    from dataclasses import replace

    return image_processor(replace(TINY, image_size=size))


def llava_config(shapes: Shapes, tokenizer) -> LlavaConfig:
    text = LlamaConfig(
        vocab_size=shapes.vocab, hidden_size=shapes.hidden, intermediate_size=shapes.intermediate,
        num_hidden_layers=shapes.layers, num_attention_heads=shapes.heads,
        num_key_value_heads=shapes.heads, max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = shapes.vision
    return LlavaConfig(
        vision_config=vision.to_dict() | {"model_type": "clip_vision_model"},
        text_config=text.to_dict(), image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )


def llava_processor(shapes: Shapes, tokenizer) -> LlavaProcessor:
    return LlavaProcessor(image_processor=clip_processor(shapes.vision.image_size),
                          tokenizer=tokenizer, patch_size=shapes.vision.patch_size,
                          vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)  # CLS, dropped by "default"


def write_models(shapes: Shapes, tokenizer, folder: Path) -> tuple[Path, Path]:
    """A LLaVA folder and a CLIP folder (HiDe-LLaVA's encoder) of these shapes, in bfloat16."""
    vision = shapes.vision
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(llava_config(shapes, tokenizer)).to(torch.bfloat16)
    processor = llava_processor(shapes, tokenizer)
    llava.save_pretrained(folder / "llava")
    processor.save_pretrained(folder / "llava")
    clip = CLIPModel(CLIPConfig(text_config=shapes.text_clip.to_dict(),
                                vision_config=vision.to_dict(),
                                projection_dim=vision.projection_dim)).to(torch.bfloat16)
    clip.save_pretrained(folder / "clip")
    tokenizer.save_pretrained(folder / "clip")
    clip_processor(vision.image_size).save_pretrained(folder / "clip")
    return folder / "llava", folder / "clip"


class Placement:
    """Where the model is, and in which dtypes, each time a stage starts training."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def wrap(self, train_model):
        def checked(model, *args, **kwargs):
            base = backbone_of(model)
            projector = {id(p) for p in base.projector(model).parameters()}
            params = list(model.named_parameters())
            self.seen.append({
                "devices": {str(p.device) for _, p in params},
                "trainable": {p.dtype for _, p in params if p.requires_grad},
                "frozen": {p.dtype for _, p in params
                           if not p.requires_grad and id(p) not in projector},
                "projector": {p.dtype for p in base.projector(model).parameters()},
                "device": str(device_of(model)),
            })
            return train_model(model, *args, **kwargs)

        return checked


def test_the_smoke_model_has_llava_1_5_7bs_geometry() -> None:
    """What the ``gpu`` test builds, checked here without a GPU (on the meta device): every
    decoder layer, the projector, a CLIP-L/14-336 layer and the 576 image tokens."""
    from cl_bench.models.llava import ModelBundle

    tokenizer = llama_tokenizer()
    shapes = llava_7b(tokenizer)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava_config(shapes, tokenizer))
    bundle = ModelBundle(model, llava_processor(shapes, tokenizer), Path("7b"))
    assert bundle.image_token_count == 576
    layers = backbone_of(model).decoder_layers(model)
    assert len(layers) == 2
    assert sum(p.numel() for p in layers[0].parameters()) == 202_383_360  # Vicuna-7B's layer
    assert sum(p.numel() for p in backbone_of(model).projector(model).parameters()) == 20_979_712
    vision = backbone_of(model).vision_tower(model)
    per_layer = sum(p.numel() for p in vision.encoder.layers[0].parameters())
    assert per_layer == 12_596_224  # a CLIP ViT-L/14 layer
    assert model.get_input_embeddings().weight.shape == (32064, 4096)


SCALES = [
    pytest.param("tiny", "cpu", tiny, marks=pytest.mark.slow),
    pytest.param("7b", "cuda", llava_7b, marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    ]),
]


@pytest.mark.parametrize(("scale", "device", "shapes_of"), SCALES)
def test_two_stages_of_each_method_family_in_bfloat16(
    scale, device, shapes_of, ucit_root, tmp_path, monkeypatch
) -> None:
    tokenizer = llama_tokenizer()
    llava, clip = write_models(shapes_of(tokenizer), tokenizer, tmp_path / "models")
    placement = Placement()
    monkeypatch.setattr(cl_bench.running.runner, "train_model",
                        placement.wrap(cl_bench.running.runner.train_model))
    peaks = {}
    for method in ("finetune", "llava_c", "hide_llava"):
        out = tmp_path / method
        extra = ["--set", f"method.encoder={clip}"] if method == "hide_llava" else \
            ["--set", "method.uir=none"] if method == "llava_c" else []
        assert main([
            "run", "--method", method, "--suite", "ucit", "--data-root", str(ucit_root),
            "--model", str(llava), "--device", device, "--order", "RA", "--out", str(out),
            "--general", "none", "--set", "model.dtype=bf16", "--set", "train.max_steps=2",
            "--set", "train.batch_size=2", "--set", "train.global_batch_size=4",
            "--set", "train.limit=8", "--set", "eval.limit=4", "--set", "eval.max_new_tokens=8",
            "--set", "train.dataloader_workers=0", *extra,
        ]) == 0
        rows = (out / "matrix.csv").read_text().splitlines()[1:]
        scores = [float(v) for row in rows for v in row.split(",")[2:]]
        assert len(rows) == 3 and all(math.isfinite(s) and 0 <= s <= 100 for s in scores)
        records = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
        assert all(math.isfinite(r["train"]["train_loss"]) for r in records[1:])
        peaks[method] = [r.get("memory_gb", {}) for r in records[1:]]
    expected_device = "cuda:0" if device == "cuda" else "cpu"
    for seen in placement.seen:  # 3 methods x 2 stages
        assert seen["devices"] == {expected_device} and seen["device"] == expected_device
        assert seen["trainable"] == {torch.float32}  # LoRA and projector
        assert seen["frozen"] == {torch.bfloat16} and seen["projector"] == {torch.float32}
    assert len(placement.seen) == 6
    if device == "cuda":
        print(f"peak GPU memory (GB) per stage: {peaks}")
        # weights 1.4 GB in bfloat16; rank-128 LoRA, its Adam state, 2 x ~650-token
        # activations with a 32k vocabulary: a few GB (docs/gpu.md)
        assert all(0 < p["peak_train"] < 12 and p["peak_eval"] < 12
                   for stages in peaks.values() for p in stages)
