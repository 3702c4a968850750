"""SAME (Xie et al., "Stabilized Mixture-of-Experts for Multimodal Continual Instruction Tuning",
ICML 2026, arXiv 2602.01990): a MoE-LoRA with one expert per task whose router updates are
rescaled along the principal input directions, whose experts' updates are preconditioned by the
previous task's input covariance, and whose rarely useful experts are frozen while a task trains.

Only the paper's abstract could be read here; the method follows the authors' release,
LAMDA-CL/Prism: ``PEFT/tuners/custom/same.py`` (the layer, ``methods/same/layer.py``),
``method/custom/same/integration.py`` and the routing prior of
``method/custom/specialized_integration.py`` (``RouterIntegration``: CLIP text and image
anchors per task, at inference a softmax over the anchors' similarity multiplies the router),
``config/methods/same.py`` (the defaults). One SAME adapter trains on through all stages, the
projector frozen. Differences: docs/recent_methods.md.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cl_bench.errors import CLBenchError
from cl_bench.method import MethodContext, Stage
from cl_bench.models.encoders import (
    TEXT_FEATURES,
    Encoder,
    MeanFeatures,
    mean_features,
    suite_encoder,
)
from cl_bench.models.moe_lora import (
    ExpertLoRALinear,
    SampleInputs,
    expert_layers,
    keep_attention_mask,
)
from cl_bench.models.routed_lora import anchor_similarity
from cl_bench.registry import register_method
from methods.moelora import MoELoRA, MoELoRAOptions
from methods.same.layer import SAMELinear, SameSettings
from tasks.loaders import Sample

Prompt = tuple[str, Image.Image | None]
ANCHOR_FILE = "same_anchors.safetensors"


@dataclass
class SAMEOptions(MoELoRAOptions):
    """SAME (defaults: the release's ``config/methods/same.py``). ``experts``: one per stage
    (the release's ``expert_num = task_num``); ``rank``: 8 per expert (UCIT 48 for 6 tasks, CoIN
    64 for 8); ``alpha``: 2 r. Dropout and targets come from ``lora`` (its recipe: 0.05, the
    FFN projections)."""

    tau: float = 0.1
    """Adaptive activation threshold on the experts' scores (``tau_score`` for LLaVA)."""
    mu: float = 0.9
    """Curvature damping mu of the experts' preconditioner (``curvature_mu``)."""
    window: int = 3
    """Sliding window over the singular values of the router update (``window_size``)."""
    components: int = 64
    """Directions of each layer's input-covariance estimate (``max_components``)."""
    energy: float = 0.9
    """Cumulative energy share of the principal directions (``cumulative_energy_ratio``)."""
    prior_scale: float = 28.0
    """Inference prior: softmax of this times the anchor similarities
    (``mixture_logit_scale``)."""
    image_weight: float = 0.2
    """Share of the image similarity in the prior (release: 0.2 image + 0.8 text)."""
    encoder: str | None = None
    """Anchor encoder: a local CLIP folder, 'llava', or None for the suite's default."""
    text_feature: str = "pooled"
    """CLIP text feature of the anchors: 'pooled' or 'projected'."""
    anchor_samples: int | None = None
    """Training samples a task's anchors average over (None: all, as the release's running
    mean over a stage's batches)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        problems = []
        for key in ("mu", "prior_scale", "components", "window"):
            if getattr(self, key) <= 0:
                problems.append(f"method.{key}={getattr(self, key)}: must be > 0")
        for key in ("energy", "image_weight"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                problems.append(f"method.{key}={getattr(self, key)}: must be in [0, 1]")
        if self.text_feature not in TEXT_FEATURES:
            problems.append(f"method.text_feature={self.text_feature!r}: expected one of "
                            f"{', '.join(TEXT_FEATURES)}")
        if self.anchor_samples is not None and self.anchor_samples < 1:
            problems.append(f"method.anchor_samples={self.anchor_samples}: must be >= 1")
        if problems:
            raise CLBenchError("; ".join(problems))


def routing_prior(text_sims: torch.Tensor, image_sims: torch.Tensor | None,
                  has_image: torch.Tensor, image_weight: float, scale: float,
                  experts: int) -> torch.Tensor:
    """Each sample's prior over the experts (B x E): ``softmax(scale * (w_i image + (1 - w_i)
    text similarity))`` over the learned tasks (text alone without an image), zero for the
    experts of tasks not learned yet (release ``_compute_cosine_similarities``,
    ``_similarities_to_mixture``)."""
    sims = text_sims
    if image_sims is not None:
        both = image_weight * image_sims + (1 - image_weight) * text_sims
        sims = torch.where(has_image.unsqueeze(1), both, text_sims)
    prior = torch.zeros(sims.shape[0], experts)
    prior[:, : sims.shape[1]] = torch.softmax(scale * sims, dim=-1)
    return prior


@register_method(
    "same",
    launchers=("single",),  # the freezing statistics and covariance estimates are per process
    paper="SAME: Xie et al., ICML 2026 (arXiv 2602.01990), as its release in LAMDA-CL/Prism",
    trains="one MoE-LoRA (one expert per stage, rank r/E each, a router per layer) on the FFN, "
           "trained on through all stages with spectral router updates, curvature-scaled "
           "expert updates and adaptive expert freezing; the projector frozen",
    growth="one CLIP text and image anchor per task; per layer, the previous task's input "
           "covariance (in x components)",
    routes=True,
    recipe={"lora.targets": ["gate_proj", "up_proj", "down_proj"], "lora.dropout": 0.05,
            "lora.train_projector": False},
)
class SAME(MoELoRA):
    """SAME: stabilised MoE-LoRA experts and router, the router's top two at inference."""

    Options = SAMEOptions
    rank_per_expert = 8  # release: UCIT r 48 for 6 tasks, CoIN 64 for 8, TriGap 80 for 10

    def __init__(self, options: SAMEOptions, context: MethodContext) -> None:
        super().__init__(options, context)
        self.encoder: Encoder = suite_encoder(options.encoder, context, options.text_feature,
                                              "same")
        self.inputs = SampleInputs()
        self.settings = SameSettings(options.tau, options.mu, options.window, options.components,
                                     options.energy)
        self.text_anchors: list[torch.Tensor] = []
        self.image_anchors: list[torch.Tensor | None] = []
        self.hooked: torch.nn.Module | None = None
        self.frozen: list[int] = []  # frozen experts per layer at the last stage's end

    def make_layer(self, name: str, linear: torch.nn.Linear) -> ExpertLoRALinear:
        seed = self.context.config.seed * 100003 + zlib.crc32(name.encode()) % 100003
        return SAMELinear(linear, self.experts, self.rank, self.scaling,
                          self.context.config.lora.dropout, self.inputs, self.settings, seed)

    def _attach(self, model: torch.nn.Module) -> None:
        if self.hooked is not model:
            keep_attention_mask(model, self.inputs)
            self.hooked = model

    # -- training ----------------------------------------------------------------------------
    def before_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        model = super().before_stage(model, stage)
        self._attach(model)
        for layer in expert_layers(model).values():
            layer.start_task(stage.index - 1)
        return model

    def after_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        """Snapshot each layer's input covariance; the task's anchors."""
        layers = expert_layers(model).values()
        for layer in layers:
            layer.end_task()
        self.frozen = [int((layer.masks == 0).sum()) for layer in layers]
        means = self.anchors(self.training_samples(stage), stage.index)
        self.text_anchors.append(means.text)
        self.image_anchors.append(means.image)
        return model

    def anchors(self, samples: list[Sample], seed: int) -> MeanFeatures:
        """The task's mean CLIP text feature of its questions and mean image feature (release
        ``_update_running_prototypes``: a running mean over the stage's batches)."""
        limit = self.options.anchor_samples
        if limit is not None and len(samples) > limit:
            samples = random.Random(seed).sample(samples, limit)
        return mean_features(self.encoder, samples, 64)

    # -- evaluation --------------------------------------------------------------------------
    def before_generate(self, model: torch.nn.Module, prompts: Sequence[Prompt],
                        label: str) -> None:
        """Each sample's routing prior from its question's and image's anchor similarities."""
        layers = expert_layers(model)
        if not layers:
            return
        text = self.encoder.text_features([q for q, _ in prompts]).cpu()
        text_sims = anchor_similarity(text, torch.stack(self.text_anchors))
        has_image = torch.tensor([image is not None for _, image in prompts])
        image_sims = None
        if has_image.any() and all(a is not None for a in self.image_anchors):
            feats = self.encoder.image_features([i for _, i in prompts if i is not None]).cpu()
            image_sims = torch.zeros_like(text_sims)
            image_sims[has_image] = anchor_similarity(feats, torch.stack(self.image_anchors))
        prior = routing_prior(text_sims, image_sims, has_image, self.options.image_weight,
                              self.options.prior_scale, self.experts)
        self.inputs.features = prior.to(next(iter(layers.values())).A.device)

    def after_evaluation(self, stage: Stage) -> dict:
        frozen = self.frozen
        return {"encoder": self.encoder.description,
                "frozen_experts_mean": sum(frozen) / len(frozen) if frozen else 0.0}

    # -- checkpoints -------------------------------------------------------------------------
    def save(self, model: torch.nn.Module, folder: Path) -> None:
        super().save(model, folder)
        tensors = {f"text.{i}": a for i, a in enumerate(self.text_anchors)}
        tensors |= {f"image.{i}": a for i, a in enumerate(self.image_anchors) if a is not None}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / ANCHOR_FILE))

    def load(self, folder: Path) -> torch.nn.Module:
        model = super().load(folder)
        self._attach(model)
        path = folder / ANCHOR_FILE
        if not path.is_file():
            raise CLBenchError(f"{path} is missing: a SAME checkpoint keeps its anchors there")
        tensors = load_file(str(path))
        count = sum(1 for k in tensors if k.startswith("text."))
        self.text_anchors = [tensors[f"text.{i}"] for i in range(count)]
        self.image_anchors = [tensors.get(f"image.{i}") for i in range(count)]
        for layer in expert_layers(model).values():
            layer.task = count - 1
        return model
