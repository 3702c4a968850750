"""Image and text feature encoders for routing (HiDe-LLaVA's anchors, eq. 2-3).

``clip``: a local CLIP folder (``CLIPModel`` + tokenizer + image processor), e.g.
``clip-vit-large-patch14-336`` as in the paper, or the micro world's tiny CLIP. Image feature:
CLIP's projected image embedding; text feature: the text tower's pooled output (the reference
code) or its projected embedding, of the text truncated to the tower's 77 positions.

``llava``: no CLIP text tower needed: the LLaVA's own vision tower (pooled CLS output) for
images and the mean of its language model's input embeddings for text.

Both run on the LLaVA's device, in its dtype, and preprocess images as the run does
(``model.image_aspect_ratio``, through the model's backbone); features come back float32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from cl_bench.errors import CLBenchError
from cl_bench.models.llava import ModelBundle, load_image
from cl_bench.models.placement import compute_dtype, device_of

if TYPE_CHECKING:
    from cl_bench.method import MethodContext
    from tasks.loaders import Sample

TEXT_FEATURES = ("pooled", "projected")
LLAVA_ENCODER = "llava"


@dataclass
class ClipEncoder:
    """CLIP's image and text towers from a local folder."""

    model: torch.nn.Module
    tokenizer: object
    image_processor: object
    path: Path
    bundle: ModelBundle
    text_feature: str = "pooled"

    @property
    def description(self) -> str:
        return f"clip:{self.path} (image: projected embedding, text: {self.text_feature})"

    @property
    def device(self) -> torch.device:
        return device_of(self.model)

    @torch.no_grad()
    def image_features(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.bundle.backbone.pixel_values(self.image_processor, images,
                                                   self.bundle.image_aspect_ratio)
        pooled = self.model.vision_model(pixel_values=pixels.to(self.device)).pooler_output
        return self.model.visual_projection(pooled).float()

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        ids, mask = clip_text_batch(self.tokenizer, texts, self.max_positions)
        out = self.model.text_model(input_ids=ids.to(self.device),
                                    attention_mask=mask.to(self.device))
        pooled = out.pooler_output
        if self.text_feature == "projected":
            pooled = self.model.text_projection(pooled)
        return pooled.float()

    @property
    def max_positions(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def clip_text_batch(tokenizer, texts: list[str], max_positions: int) -> tuple[torch.Tensor, ...]:
    """Token ids truncated to ``max_positions`` (77 for CLIP), each row ending in EOS.

    CLIP pools the EOS position; a tokenizer that adds no EOS itself (the micro tokenizer) gets
    one appended, as the micro CLIP was trained.
    """
    eos = tokenizer.eos_token_id
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True, truncation=True,
                        max_length=max_positions).input_ids
        if not ids or ids[-1] != eos:
            ids = [*ids[: max_positions - 1], eos]
        rows.append(ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


@dataclass
class LlavaEncoder:
    """The LLaVA's own towers: vision tower CLS output, mean input embedding of the text."""

    bundle: ModelBundle

    description = "llava (vision tower pooled output; mean language-model input embedding)"

    @property
    def _model(self) -> torch.nn.Module:
        return self.bundle.model

    @torch.no_grad()
    def image_features(self, images: list[Image.Image]) -> torch.Tensor:
        tower = self.bundle.backbone.vision_tower(self._model)
        pixels = self.bundle.pixel_values(images).to(device_of(tower))
        return tower(pixel_values=pixels).pooler_output.float()

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        embed = self._model.get_input_embeddings()
        rows = []
        for text in texts:
            ids = self.bundle.tokenizer(text, add_special_tokens=False).input_ids or [
                self.bundle.tokenizer.eos_token_id
            ]
            rows.append(embed(torch.tensor(ids, device=embed.weight.device)).float().mean(0))
        return torch.stack(rows).float()

    def parameter_count(self) -> int:
        return 0  # part of the LLaVA itself


Encoder = ClipEncoder | LlavaEncoder


@dataclass
class MeanFeatures:
    """Mean question and image features of some samples (routing anchors)."""

    text: torch.Tensor
    image: torch.Tensor | None  # None: no sample had an image
    images: int


def mean_features(encoder: Encoder, samples: list[Sample], batch: int) -> MeanFeatures:
    """The mean text feature of the samples' questions and the mean image feature of those
    with an image, float32 on the CPU, encoded ``batch`` samples at a time."""
    text_sum = image_sum = None
    images = 0
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        text = encoder.text_features([s.question for s in chunk]).sum(0)
        text_sum = text if text_sum is None else text_sum + text
        pictures = [load_image(s.image) for s in chunk if s.image is not None]
        if pictures:
            feats = encoder.image_features(pictures).sum(0)
            image_sum = feats if image_sum is None else image_sum + feats
            images += len(pictures)
    return MeanFeatures(text_sum.cpu() / len(samples),
                        image_sum.cpu() / images if images else None, images)


def load_encoder(spec: str, bundle: ModelBundle, text_feature: str = "pooled") -> Encoder:
    """``llava``, or a local CLIP folder; anything else is a clear error naming the path."""
    if text_feature not in TEXT_FEATURES:
        raise CLBenchError(f"text_feature {text_feature!r}: expected one of {TEXT_FEATURES}")
    if spec == LLAVA_ENCODER:
        return LlavaEncoder(bundle)
    folder = Path(spec).expanduser()
    if not (folder / "config.json").is_file():
        what = "does not exist" if not folder.exists() else "has no config.json"
        raise CLBenchError(
            f"text encoder folder {folder} {what}: give method.encoder=PATH, a local CLIP folder "
            "(CLIPModel weights, tokenizer and preprocessor files, e.g. "
            f"clip-vit-large-patch14-336), or method.encoder={LLAVA_ENCODER} to use the LLaVA's "
            "own towers"
        )
    from transformers import AutoTokenizer, CLIPModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        processor = _image_processor_class().from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise CLBenchError(f"cannot load a CLIP model from {folder}: {err}") from None
    model = model.to(device_of(bundle.model), compute_dtype(bundle.model)).eval()
    return ClipEncoder(model, tokenizer, processor, folder, bundle, text_feature)


def suite_encoder(
    spec: str | None, context: MethodContext, text_feature: str, method: str
) -> Encoder:
    """The encoder a method's ``encoder`` option names (a CLIP folder or ``llava``), else the
    suite's default (the micro world's tiny CLIP); a clear error when there is neither."""
    suite = context.suite
    if spec is None and suite.default_encoder:
        from cl_bench.registry import call_target
        from cl_bench.running.runner import cache_dir

        spec = str(call_target(suite.default_encoder, cache_dir()))
    if spec is None:
        raise CLBenchError(
            f"{method} needs a feature encoder and suite {suite.name} has no default: give "
            "method.encoder=PATH (a local CLIP folder, e.g. clip-vit-large-patch14-336) or "
            f"method.encoder={LLAVA_ENCODER}"
        )
    return load_encoder(spec, context.bundle, text_feature)


def _image_processor_class() -> type:
    """CLIP's PIL image processor (torchvision is not a dependency)."""
    try:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    except ImportError:  # transformers 4.x: the PIL processor is the default one
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor
