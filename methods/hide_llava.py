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

import copy
import csv
import dataclasses
import functools
import itertools
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from cl_bench.deltas import LoraFactors, stage_delta
from cl_bench.encoders import LLAVA_ENCODER, TEXT_FEATURES, Encoder, load_encoder
from cl_bench.errors import CLBenchError
from cl_bench.method import Method, MethodContext, Stage
from cl_bench.models import add_lora, load_image
from cl_bench.registry import call_target, register_method
from tasks.loaders import Sample

# layout -> (mode of the top layer(s), mode of every other layer); modes: expand | merge | none
LAYOUTS = {
    "hide": ("expand", "merge"),  # HiDe-LLaVA
    "merge_all": ("merge", "merge"),  # Table 3 "Merge (1-32)": fuse every layer
    "merge_rest": ("none", "merge"),  # Table 3 "Merge (1-31)": fuse 1-31, no LoRA on the top
    "expand_all": ("expand", "expand"),  # Table 3 "Expand (1-32)": route every layer
    "expand_rest": ("none", "expand"),  # Table 3 "Expand (1-31)": route 1-31, no LoRA on the top
}
FUSIONS = ("sum", "reference")
PARAMS_NOTE = (
    "parameters loaded at inference: total = model + lora + anchors; lora counts what Table 3 "
    "counts (routed layers keep every task's LoRA, fused layers one LoRA of the task rank); "
    "encoder = the routing encoder's own parameters, loaded too"
)
Prompt = tuple[str, Image.Image | None]
_LAYER_INDEX = re.compile(r"language_model\.(?:model\.)?layers\.(\d+)\.")


@dataclass
class HiDeOptions:
    """HiDe-LLaVA options (paper values by default; rank None = the config's ``lora.rank``).

    layout: hide | merge_all | merge_rest | expand_all | expand_rest (Table 3).
    fusion: sum (eq. 6: sum of the tasks' B_i A_i) | reference ((sum B_i)(sum A_i), the
    reference code). encoder: a local CLIP folder, ``llava``, or None for the suite's default.
    """

    rank: int | None = None
    temperature: float = 0.1
    image_weight: float = 0.5
    text_weight: float = 0.5
    fusion: str = "sum"
    fusion_weight: float = 1.0
    layout: str = "hide"
    top_layers: int = 1
    encoder: str | None = None
    text_feature: str = "pooled"
    anchor_samples: int | None = None
    encoder_batch: int = 64


# -- routing: HiDe-LLaVA eq. 3-5 ----------------------------------------------------------------
def anchor_similarity(features: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each sample (B x D) to each task anchor (C x D): B x C."""
    anchors = anchors.to(features.device, torch.float32)
    return torch.nn.functional.cosine_similarity(  # HiDe-LLaVA eq. 3
        features.float().unsqueeze(1), anchors.unsqueeze(0), dim=-1
    )


def routing_weights(
    image_sims: torch.Tensor | None,
    text_sims: torch.Tensor,
    has_image: torch.Tensor,
    image_weight: float,
    text_weight: float,
    temperature: float,
) -> torch.Tensor:
    """Per-sample weights d (B x C) over the learned tasks.

    Samples without an image (or when no image similarity is given) route on text alone.
    """
    text_only = text_sims
    if image_sims is None:
        combined = text_only
    else:
        both = image_weight * image_sims + text_weight * text_sims  # HiDe-LLaVA eq. 4, r-bar
        combined = torch.where(has_image.unsqueeze(1), both, text_only)
    return torch.softmax(combined / temperature, dim=-1)  # HiDe-LLaVA eq. 4, d_c


# -- fusion: HiDe-LLaVA eq. 6 -------------------------------------------------------------------
def fused_factors(
    experts: list[LoraFactors], fusion: str = "sum", weight: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B_f, A_f) of the fused LoRA, scaling included: delta = B_f @ A_f.

    ``sum``: sum_i eps_i s_i B_i A_i (HiDe-LLaVA eq. 6), exactly, as a rank-(sum r_i) product.
    ``reference``: (sum_i eps_i s_i B_i)(sum_i eps_i A_i), cross terms included (reference code).
    """
    if fusion == "sum":
        B = torch.cat([weight * f.scaling * f.B.float() for f in experts], dim=1)
        A = torch.cat([f.A.float() for f in experts], dim=0)
        return B, A  # HiDe-LLaVA eq. 6: B @ A = sum_i eps_i * s_i * B_i @ A_i
    if fusion == "reference":
        ranks = {f.A.shape[0] for f in experts}
        if len(ranks) != 1:
            raise CLBenchError(f"fusion=reference needs LoRAs of one rank, not {sorted(ranks)}")
        B = sum(weight * f.scaling * f.B.float() for f in experts)
        A = sum(weight * f.A.float() for f in experts)
        return B, A
    raise CLBenchError(f"fusion {fusion!r}: expected one of {FUSIONS}")


class Routing:
    """Per-sample routing weights shared by every routed module of one assembled model."""

    def __init__(self) -> None:
        self.weights: torch.Tensor | None = None

    def for_rows(self, rows: int) -> torch.Tensor:
        d = self.weights
        if d is None:
            raise CLBenchError(
                "HiDe-LLaVA routing weights are not set: generation must go through "
                "cl_bench.evaluation.generate_answers with the method's before_generate hook"
            )
        if rows != d.shape[0]:
            if rows % d.shape[0]:
                raise CLBenchError(f"batch of {rows} rows, routing weights for {d.shape[0]}")
            d = d.repeat_interleave(rows // d.shape[0], dim=0)
        return d


class RoutedLoRALinear(torch.nn.Module):
    """base(x) + sum_c d_c * s_c * B_c A_c x, with per-sample weights d (HiDe-LLaVA eq. 5)."""

    def __init__(self, base: torch.nn.Linear, experts: list[LoraFactors], routing: Routing) -> None:
        super().__init__()
        self.base, self.routing = base, routing
        w = base.weight
        self.A = torch.nn.ParameterList(
            [torch.nn.Parameter(f.A.to(w), requires_grad=False) for f in experts]
        )
        self.B = torch.nn.ParameterList(
            [torch.nn.Parameter((f.scaling * f.B.float()).to(w), requires_grad=False)
             for f in experts]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        d = self.routing.for_rows(x.shape[0]).to(out.dtype)
        shape = (x.shape[0], *([1] * (x.ndim - 1)))
        for c, (A, B) in enumerate(zip(self.A, self.B, strict=True)):
            out = out + d[:, c].view(shape) * ((x @ A.T) @ B.T)  # HiDe-LLaVA eq. 5
        return out

    def lora_parameters(self) -> int:
        return sum(p.numel() for p in itertools.chain(self.A, self.B))


class FusedLoRALinear(torch.nn.Module):
    """base(x) + B_f A_f x: the fused LoRA branch of the remaining layers (HiDe-LLaVA eq. 7)."""

    def __init__(self, base: torch.nn.Linear, B: torch.Tensor, A: torch.Tensor, rank: int) -> None:
        super().__init__()
        self.base, self.rank = base, rank
        w = base.weight
        self.A = torch.nn.Parameter(A.to(w), requires_grad=False)
        self.B = torch.nn.Parameter(B.to(w), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A.T) @ self.B.T  # HiDe-LLaVA eq. 7: O_rem = E-bar_T(h)

    def lora_parameters(self) -> int:
        """One LoRA of the experts' rank (Table 3's count; fusion=sum may merge it into W)."""
        return self.rank * (self.base.in_features + self.base.out_features)


# -- stored experts ------------------------------------------------------------------------------
@dataclass
class TaskExpert:
    """What one stage leaves behind: its LoRA factors, projector and anchors (eq. 2)."""

    task: str
    stage: int
    lora: dict[str, LoraFactors]
    projector: dict[str, torch.Tensor] = field(default_factory=dict)
    image_anchor: torch.Tensor | None = None
    text_anchor: torch.Tensor | None = None
    anchor_samples: int = 0
    image_samples: int = 0
    encoder: str = ""

    @property
    def file_name(self) -> str:
        return f"task_{self.stage}.safetensors"

    def save(self, folder: Path) -> Path:
        tensors: dict[str, torch.Tensor] = {}
        for name, f in self.lora.items():
            tensors[f"lora::{name}::A"], tensors[f"lora::{name}::B"] = f.A, f.B
        tensors |= {f"projector::{name}": t for name, t in self.projector.items()}
        if self.image_anchor is not None:
            tensors["anchor::image"] = self.image_anchor
        if self.text_anchor is not None:
            tensors["anchor::text"] = self.text_anchor
        meta = {
            "task": self.task, "stage": str(self.stage), "encoder": self.encoder,
            "anchor_samples": str(self.anchor_samples), "image_samples": str(self.image_samples),
            "scalings": json.dumps({name: f.scaling for name, f in self.lora.items()}),
        }
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / self.file_name
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), meta)
        return path

    @classmethod
    def load(cls, path: Path) -> TaskExpert:
        if not path.is_file():
            raise CLBenchError(f"HiDe-LLaVA expert file {path} is missing")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        if "scalings" not in meta:
            raise CLBenchError(f"{path} is not a HiDe-LLaVA expert file (no metadata)")
        scalings = json.loads(meta["scalings"])
        lora = {
            name: LoraFactors(tensors[f"lora::{name}::B"], tensors[f"lora::{name}::A"], s)
            for name, s in scalings.items()
        }
        projector = {
            k.split("::", 1)[1]: t for k, t in tensors.items() if k.startswith("projector::")
        }
        return cls(
            meta["task"], int(meta["stage"]), lora, projector, tensors.get("anchor::image"),
            tensors.get("anchor::text"), int(meta.get("anchor_samples", 0)),
            int(meta.get("image_samples", 0)), meta.get("encoder", ""),
        )

    def check_anchors(self, where: Path | str) -> None:
        """A routed model needs both anchors (the image one unless the task had no images)."""
        missing = [
            kind for kind, anchor, needed in (
                ("text", self.text_anchor, True),
                ("image", self.image_anchor, self.image_samples > 0),
            ) if needed and anchor is None
        ]
        if missing:
            raise CLBenchError(
                f"{where}: stage {self.stage} ({self.task}) has no {' or '.join(missing)} anchor; "
                "HiDe-LLaVA routes the top layer by the anchors saved with each stage (eq. 2)"
            )


def load_experts(folder: Path) -> list[TaskExpert]:
    """Every expert file of a folder (a checkpoint's or a run's ``hide_llava/``), by stage."""
    files = sorted(folder.glob("task_*.safetensors"),
                   key=lambda p: int(p.stem.removeprefix("task_")))
    if not files:
        raise CLBenchError(f"no HiDe-LLaVA expert files (task_<stage>.safetensors) in {folder}")
    return [TaskExpert.load(path) for path in files]


# -- assembly -----------------------------------------------------------------------------------
@dataclass
class InferenceParams:
    """Parameters loaded at inference: the model, the LoRA kept (Table 3's count), anchors."""

    model: int
    lora: int
    anchors: int
    encoder: int

    @property
    def total(self) -> int:
        return self.model + self.lora + self.anchors

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "total": self.total}


def layer_index(module_name: str) -> int:
    match = _LAYER_INDEX.search(module_name)
    if match is None:
        raise CLBenchError(f"LoRA module {module_name!r} is not inside a decoder layer")
    return int(match.group(1))


def shallow_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree that shares every parameter and buffer with ``model``."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def layer_modes(experts: list[TaskExpert], layout: str, top_layers: int,
                n_layers: int) -> dict[str, str]:
    """The mode (expand | merge | none) of each LoRA-carrying module."""
    if layout not in LAYOUTS:
        raise CLBenchError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    top, rest = LAYOUTS[layout]
    names = list(experts[0].lora)
    for expert in experts[1:]:
        if set(expert.lora) != set(names):
            raise CLBenchError(
                f"stage {expert.stage} ({expert.task}) has LoRA on other modules than stage "
                f"{experts[0].stage}: HiDe-LLaVA needs the same LoRA targets in every stage"
            )
    return {n: top if layer_index(n) >= n_layers - top_layers else rest for n in names}


def assemble(
    model: torch.nn.Module,
    experts: list[TaskExpert],
    options: HiDeOptions,
    routing: Routing,
) -> tuple[torch.nn.Module, InferenceParams]:
    """The evaluation model of HiDe-LLaVA Algorithm 1 (lines 8-17); ``model`` is not changed."""
    from cl_bench.cka import decoder_layers

    n_layers = len(decoder_layers(model))
    modes = layer_modes(experts, options.layout, options.top_layers, n_layers)
    assembled = shallow_copy(model)
    lora_params = 0
    for name, mode in modes.items():
        if mode == "none":
            continue
        base = assembled.get_submodule(name)
        factors = [e.lora[name] for e in experts]
        if mode == "expand":
            module: RoutedLoRALinear | FusedLoRALinear = RoutedLoRALinear(base, factors, routing)
        else:
            B, A = fused_factors(factors, options.fusion, options.fusion_weight)
            module = FusedLoRALinear(base, B, A, max(f.A.shape[0] for f in factors))
        lora_params += module.lora_parameters()
        assembled.set_submodule(name, module)
    routed = "expand" in modes.values()
    anchors = sum(
        sum(a.numel() for a in (e.image_anchor, e.text_anchor) if a is not None) for e in experts
    ) if routed else 0
    plain = sum(p.numel() for p in model.parameters())
    return assembled, InferenceParams(plain, lora_params, anchors, 0)


def set_projector(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load stored projector weights into ``model``."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            if name not in params:
                raise CLBenchError(f"stored projector parameter {name!r} is absent from the model")
            params[name].copy_(value.to(params[name]))


def expert_model(model: torch.nn.Module, expert: TaskExpert) -> torch.nn.Module:
    """The task's own fine-tuned model: ``model`` + the task's projector + its LoRA, merged."""
    single = copy.deepcopy(model)
    set_projector(single, expert.projector)
    with torch.no_grad():
        for name, factors in expert.lora.items():
            weight = single.get_submodule(name).weight
            weight += factors.product().to(weight)
    return single


# -- the method ---------------------------------------------------------------------------------
def _check_options(o: HiDeOptions) -> None:
    problems = []
    if o.layout not in LAYOUTS:
        problems.append(f"method.layout={o.layout!r}: expected one of {', '.join(LAYOUTS)}")
    if o.fusion not in FUSIONS:
        problems.append(f"method.fusion={o.fusion!r}: expected one of {', '.join(FUSIONS)}")
    if o.text_feature not in TEXT_FEATURES:
        problems.append(f"method.text_feature={o.text_feature!r}: expected one of {TEXT_FEATURES}")
    if o.temperature <= 0:
        problems.append(f"method.temperature={o.temperature}: must be > 0")
    if o.image_weight < 0 or o.text_weight < 0 or o.image_weight + o.text_weight == 0:
        problems.append("method.image_weight and method.text_weight: >= 0, not both 0")
    if o.top_layers < 1:
        problems.append(f"method.top_layers={o.top_layers}: must be >= 1")
    if o.rank is not None and o.rank < 1:
        problems.append(f"method.rank={o.rank}: must be >= 1")
    if problems:
        raise CLBenchError("; ".join(problems))


@register_method("hide_llava")
class HiDeLLaVA(Method):
    """HiDe-LLaVA: top-layer LoRA experts routed by anchors, the other layers' LoRAs fused."""

    Options = HiDeOptions

    def __init__(self, options: HiDeOptions, context: MethodContext) -> None:
        super().__init__(options, context)
        _check_options(options)
        self.experts: list[TaskExpert] = []
        self.routing: Routing | None = None
        self.routing_counts: dict[str, list[int]] = {}
        self.params: InferenceParams | None = None
        self.encoder: Encoder | None = self._encoder() if self.routed else None

    @property
    def routed(self) -> bool:
        return "expand" in LAYOUTS[self.options.layout]

    @property
    def expert_dir(self) -> Path:
        return self.context.run_dir / "hide_llava"

    def _encoder(self) -> Encoder:
        spec = self.options.encoder
        suite = self.context.suite
        if spec is None and suite.default_encoder:
            from cl_bench.runner import cache_dir

            spec = str(call_target(suite.default_encoder, cache_dir()))
        if spec is None:
            raise CLBenchError(
                f"hide_llava needs a feature encoder for its anchors and suite {suite.name} has no "
                "default: give method.encoder=PATH (a local CLIP folder, e.g. "
                f"clip-vit-large-patch14-336) or method.encoder={LLAVA_ENCODER}"
            )
        return load_encoder(spec, self.context.bundle, self.options.text_feature)

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
        expert.save(self.expert_dir)
        self.experts = [e for e in self.experts if e.stage < stage.index] + [expert]
        return plain

    def _add_anchors(self, expert: TaskExpert, samples: list[Sample], seed: int) -> None:
        """Mean image and question features over the task's training samples (eq. 2)."""
        limit = self.options.anchor_samples
        if limit is not None and len(samples) > limit:
            samples = random.Random(seed).sample(samples, limit)
        image_sum = text_sum = None
        n_images = 0
        step = self.options.encoder_batch
        for start in range(0, len(samples), step):
            chunk = samples[start : start + step]
            text = self.encoder.text_features([s.question for s in chunk]).sum(0)
            text_sum = text if text_sum is None else text_sum + text
            images = [load_image(s.image) for s in chunk if s.image is not None]
            if images:
                feats = self.encoder.image_features(images).sum(0)
                image_sum = feats if image_sum is None else image_sum + feats
                n_images += len(images)
        expert.text_anchor = text_sum.cpu() / len(samples)  # HiDe-LLaVA eq. 2, m_ins
        expert.image_anchor = image_sum.cpu() / n_images if n_images else None  # eq. 2, m_v
        expert.anchor_samples, expert.image_samples = len(samples), n_images
        expert.encoder = self.encoder.description

    # -- evaluation --------------------------------------------------------------------------
    def eval_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.experts:
            return model
        if self.routed:
            for expert in self.experts:
                expert.check_anchors(self.expert_dir / expert.file_name)
        self.routing = Routing() if self.routed else None
        self.routing_counts = {}
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
        device = next(model.parameters()).device
        self.routing.weights = d.to(device)
        counts = self.routing_counts.setdefault(label, [0] * len(self.experts))
        for c in d.argmax(dim=1).tolist():
            counts[c] += 1

    def route(self, prompts: Sequence[Prompt]) -> torch.Tensor:
        """Routing weights d (B x C, on the CPU) of a batch, from its images and questions."""
        o = self.options
        has_image = torch.tensor([image is not None for _, image in prompts])
        image_anchors = [e.image_anchor for e in self.experts]
        use_images = o.image_weight > 0 and bool(has_image.any()) and all(
            a is not None for a in image_anchors
        )
        text_sims = anchor_similarity(
            self.encoder.text_features([question for question, _ in prompts]).cpu(),
            self._anchors([e.text_anchor for e in self.experts]),
        )
        image_sims = None
        if use_images:
            images = [image for _, image in prompts if image is not None]
            feats = self.encoder.image_features(images).cpu()
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
            info["routing_accuracy"] = self.write_routing(stage.index)
        return info

    def write_routing(self, stage: int) -> dict[str, float | None]:
        """Write the evaluated-task x routed-task counts; return each task's routing accuracy."""
        experts = [e.task for e in self.experts]
        accuracy: dict[str, float | None] = {}
        folder = self.context.run_dir / "routing"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"stage_{stage}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["evaluated", *experts, "routing_accuracy"])
            for label, counts in self.routing_counts.items():
                total = sum(counts)
                right = counts[experts.index(label)] if label in experts else None
                accuracy[label] = None if right is None or not total else 100.0 * right / total
                shown = "" if accuracy[label] is None else f"{accuracy[label]:.2f}"
                writer.writerow([label, *counts, shown])
        return accuracy

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
    from cl_bench.evaluation import evaluate_task

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


@dataclass
class MergeAllOptions(HiDeOptions):
    layout: str = "merge_all"


@register_method("hide_llava_merge_all")
class HiDeMergeAll(HiDeLLaVA):
    """HiDe-LLaVA ablation Merge (1-32) (Table 3): every layer's LoRAs fused, no routing."""

    Options = MergeAllOptions


@dataclass
class MergeRestOptions(HiDeOptions):
    layout: str = "merge_rest"


@register_method("hide_llava_merge_rest")
class HiDeMergeRest(HiDeLLaVA):
    """HiDe-LLaVA ablation Merge (1-31) (Table 3): layers below the top fused, no top LoRA."""

    Options = MergeRestOptions


@dataclass
class ExpandAllOptions(HiDeOptions):
    layout: str = "expand_all"


@register_method("hide_llava_expand_all")
class HiDeExpandAll(HiDeLLaVA):
    """HiDe-LLaVA ablation Expand (1-32) (Table 3): every layer's LoRAs routed by anchors."""

    Options = ExpandAllOptions


@dataclass
class ExpandRestOptions(HiDeOptions):
    layout: str = "expand_rest"


@register_method("hide_llava_expand_rest")
class HiDeExpandRest(HiDeLLaVA):
    """HiDe-LLaVA ablation Expand (1-31) (Table 3): layers below the top routed, no top LoRA."""

    Options = ExpandRestOptions


@dataclass
class ImageRoutingOptions(HiDeOptions):
    image_weight: float = 1.0
    text_weight: float = 0.0


@register_method("hide_llava_image")
class HiDeImageRouting(HiDeLLaVA):
    """HiDe-LLaVA ablation (Figure 4): the top layer routed by image similarity only."""

    Options = ImageRoutingOptions


@dataclass
class TextRoutingOptions(HiDeOptions):
    image_weight: float = 0.0
    text_weight: float = 1.0


@register_method("hide_llava_text")
class HiDeTextRouting(HiDeLLaVA):
    """HiDe-LLaVA ablation (Figure 4): the top layer routed by text similarity only."""

    Options = TextRoutingOptions
