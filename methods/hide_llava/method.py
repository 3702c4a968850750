"""HiDe-LLaVA: task-specific expansion of the top layer, task-general fusion of the others.

Training (HiDe-LLaVA Algorithm 1): each stage trains a fresh LoRA (and the shared projector) on
the base model; the earlier LoRAs take no part. After the stage its LoRA factors, the projector
and the task's image and text anchors (eq. 2) are stored. At evaluation the model is assembled
without a task id: in the top layer the LoRA branch is the mixture of every task's LoRA weighted
per sample by the similarity of its image and question to each task's anchors (eq. 3-5); every
other layer carries the fused LoRA (eq. 6-7). The Table 3 ablations are other ``layout`` values,
single-modality routing (Figure 4) other ``image_weight``/``text_weight`` values.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image

from cl_bench.evaluation.routing_counts import RoutingCounts
from cl_bench.method import Method, MethodContext, Stage
from cl_bench.models.deltas import stage_delta
from cl_bench.models.encoders import Encoder, mean_features, suite_encoder
from cl_bench.models.lora import add_lora
from cl_bench.models.placement import device_of
from cl_bench.models.routed_lora import Routing, anchor_similarity
from cl_bench.registry import register_method
from methods.hide_llava.assembly import PARAMS_NOTE, InferenceParams, assemble, expert_model
from methods.hide_llava.experts import TaskExpert, load_experts, set_projector
from methods.hide_llava.options import LAYOUTS, HiDeOptions, check_options
from methods.hide_llava.routing import routing_weights
from tasks.loaders import Sample

Prompt = tuple[str, Image.Image | None]


@register_method(
    "hide_llava",
    launchers=("single", "ddp", "zero2"),
    paper="HiDe-LLaVA (Guo et al., ACL 2025), eq. 2-7, Algorithm 1",
    trains="a fresh LoRA on the base model + the shared projector each stage",
    growth="one LoRA per task kept (routed at the top layer, fused below) + 2 anchors per task",
    routes=True,
    # HiDe-LLaVA section 4.1: LoRA rank 8 in every linear layer of the language model; the
    # paper gives no alpha: 16 keeps LLaVA-1.5's alpha = 2 x rank
    recipe={"lora.rank": 8, "lora.alpha": 16.0},
)
class HiDeLLaVA(Method):
    """HiDe-LLaVA: top-layer LoRA experts routed by anchors, the other layers' LoRAs fused."""

    Options = HiDeOptions

    def __init__(self, options: HiDeOptions, context: MethodContext) -> None:
        super().__init__(options, context)
        check_options(options)
        self.experts: list[TaskExpert] = []
        self.routing: Routing | None = None
        self.routing_counts = RoutingCounts([])
        self.params: InferenceParams | None = None
        self.encoder: Encoder | None = (
            suite_encoder(options.encoder, context, options.text_feature, "hide_llava")
            if self.routed else None
        )

    @property
    def routed(self) -> bool:
        return "expand" in LAYOUTS[self.options.layout]

    @property
    def expert_dir(self) -> Path:
        return self.context.run_dir / "hide_llava"

    # -- training ----------------------------------------------------------------------------
    def before_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        """A fresh LoRA on the base model (the earlier tasks' LoRAs are stored, not loaded)."""
        lora = self.context.config.lora
        if self.options.rank is not None:
            lora = dataclasses.replace(lora, rank=self.options.rank)
        return add_lora(model, lora)

    def after_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        """Keep the stage's LoRA factors, projector and anchors; return the plain model."""
        lora = stage_delta(model, {}).lora
        plain = model.unload()
        projector = {
            n: p.detach().clone()
            for n, p in plain.named_parameters()
            if "multi_modal_projector" in n
        }
        expert = TaskExpert(stage.name, stage.index, lora, projector)
        if self.encoder is not None:
            self._add_anchors(expert, self.training_samples(stage), stage.index)
        if self.context.writes:  # rank 0 under a launcher
            expert.save(self.expert_dir)
        self.experts = [e for e in self.experts if e.stage < stage.index] + [expert]
        return plain

    def _add_anchors(self, expert: TaskExpert, samples: list[Sample], seed: int) -> None:
        """Mean image and question features over the task's training samples (eq. 2)."""
        limit = self.options.anchor_samples
        if limit is not None and len(samples) > limit:
            samples = random.Random(seed).sample(samples, limit)
        means = mean_features(self.encoder, samples, self.options.encoder_batch)
        expert.text_anchor = means.text  # HiDe-LLaVA eq. 2, m_ins
        expert.image_anchor = means.image  # HiDe-LLaVA eq. 2, m_v
        expert.anchor_samples, expert.image_samples = len(samples), means.images
        expert.encoder = self.encoder.description

    # -- evaluation --------------------------------------------------------------------------
    def eval_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.experts:
            return model
        if self.routed:
            for expert in self.experts:
                expert.check_anchors(self.expert_dir / expert.file_name)
        self.routing = Routing() if self.routed else None
        self.routing_counts = RoutingCounts([e.task for e in self.experts])
        assembled, params = assemble(model, self.experts, self.options, self.routing or Routing())
        if self.encoder is not None:
            params.encoder = self.encoder.parameter_count()
        self.params = params
        return assembled

    def before_generate(
        self, model: torch.nn.Module, prompts: Sequence[Prompt], label: str
    ) -> None:
        """Route this batch: per-sample weights over the learned tasks (eq. 3-4)."""
        if self.routing is None or self.encoder is None:
            return
        d = self.route(prompts)
        self.routing.weights = d.to(device_of(model))
        self.routing_counts.add(label, d.argmax(dim=1).tolist())

    def route(self, prompts: Sequence[Prompt]) -> torch.Tensor:
        """Routing weights d (B x C, on the encoder's device) of a batch, from its images and
        questions."""
        o = self.options
        text_features = self.encoder.text_features([question for question, _ in prompts])
        has_image = torch.tensor([image is not None for _, image in prompts],
                                 device=text_features.device)
        image_anchors = [e.image_anchor for e in self.experts]
        use_images = o.image_weight > 0 and bool(has_image.any()) and all(
            a is not None for a in image_anchors
        )
        text_sims = anchor_similarity(
            text_features, self._anchors([e.text_anchor for e in self.experts])
        )
        image_sims = None
        if use_images:
            images = [image for _, image in prompts if image is not None]
            feats = self.encoder.image_features(images)
            image_sims = torch.zeros_like(text_sims)
            image_sims[has_image] = anchor_similarity(feats, self._anchors(image_anchors))
        else:
            has_image = torch.zeros_like(has_image)
        return routing_weights(image_sims, text_sims, has_image, o.image_weight, o.text_weight,
                               o.temperature)

    def _anchors(self, anchors: list[torch.Tensor | None]) -> torch.Tensor:
        for expert, anchor in zip(self.experts, anchors, strict=True):
            if anchor is None:
                expert.check_anchors(self.expert_dir / expert.file_name)
        return torch.stack([a.float() for a in anchors])

    def after_evaluation(self, stage: Stage) -> dict:
        """The routing confusion matrix (``routing/stage_<t>.csv``) and the inference size."""
        info: dict = {"layout": self.options.layout, "fusion": self.options.fusion}
        if self.params is not None:
            info["params"] = self.params.as_dict()
            info["params_note"] = PARAMS_NOTE
        if self.encoder is not None:
            info["encoder"] = self.encoder.description
        if self.routing_counts:
            info["routing_accuracy"] = self.routing_counts.write(self.context.run_dir, stage.index)
        return info

    # -- checkpoints -------------------------------------------------------------------------
    def save(self, model: torch.nn.Module, folder: Path) -> None:
        super().save(model, folder)
        for expert in self.experts:
            expert.save(folder / "hide_llava")

    def load(self, folder: Path) -> torch.nn.Module:
        model = super().load(folder)
        self.experts = load_experts(folder / "hide_llava")
        if self.routed:
            for expert in self.experts:
                expert.check_anchors(folder / "hide_llava" / expert.file_name)
        return model

    def task_models(
        self, run_dir: Path, model: torch.nn.Module
    ) -> Iterator[tuple[str, torch.nn.Module]]:
        """Each stored task's own model: ``model`` + that task's projector and LoRA, merged."""
        for expert in load_experts(run_dir / "hide_llava"):
            yield expert.task, expert_model(model, expert)

    def state(self) -> dict:
        return {
            "experts": [{"task": e.task, "stage": e.stage, "file": e.file_name}
                        for e in self.experts],
            "encoder": self.encoder.description if self.encoder is not None else None,
        }


def replay_stages(
    method: HiDeLLaVA, experts: list[TaskExpert], tasks: list, test_sets: dict
) -> list[tuple[list[float], dict]]:
    """Re-evaluate a run's stages under ``method``'s options (e.g. another Table 3 layout).

    Training does not depend on the layout or the routing options (each stage trains the base
    model + its own LoRA + the carried projector), so stage t of such a run is exactly the
    stored projector_t and experts 1..t assembled another way. Returns, per stage, the task
    scores (in ``tasks`` order) and the method's diagnostics.
    """
    from cl_bench.evaluation.generation import evaluate_task

    ctx, cfg = method.context, method.context.config
    model = ctx.bundle.model
    stages = []
    for t, expert in enumerate(experts, start=1):
        set_projector(model, expert.projector)
        method.experts = experts[:t]
        assembled = method.eval_model(model)
        scores = []
        for task in tasks:
            hook = functools.partial(method.before_generate, assembled, label=task.name)
            result = evaluate_task(
                assembled, ctx.bundle, task.name, task.answer_type, test_sets[task.name],
                cfg.eval.batch_size, cfg.eval.max_new_tokens, cfg.eval.rule, hook,
            )
            scores.append(result.score.score)
        stages.append((scores, method.after_evaluation(Stage(t, (tasks[t - 1],)))))
    return stages
