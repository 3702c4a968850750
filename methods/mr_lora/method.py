"""MR-LoRA (Zhao et al., "MLLM-CL: Continual Learning for Multimodal Large Language Models",
2025): an isolated expert LoRA per task, chosen per sample by the MLLM itself with a router LoRA.

Training: each stage trains a fresh expert LoRA and projector from the starting model (earlier
experts take no part, so nothing is overwritten); then the router LoRA, continued from the
previous stage's, is fine-tuned on the router set: a few training samples of every learned task,
asked which expert (by letter) suits them. Inference is two-stage: the starting model with the
router LoRA and projector answers the routing question, then the chosen expert (its LoRA and
its projector on the starting model) answers the user's question.

Reference code checked (facts only): bjzhb666/MLLM-CL scripts/LLaVA/Train_dom_single/*.sh
(experts from the base model, router LoRA lr 5e-6 for 40 epochs on Router_train20),
ETrain/Eval/LLaVA/CoIN/model_agents_select_lora.py (routing prompt, letter parsing, random
fallback, 16 new tokens). Differences from the reference: docs/recent_methods.md.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from cl_bench.errors import CLBenchError
from cl_bench.evaluation.generation import generate_texts
from cl_bench.evaluation.routing_counts import RoutingCounts
from cl_bench.method import Method, MethodContext, Stage
from cl_bench.models.deltas import LoraFactors, load_lora_file, save_lora_file, stage_delta
from cl_bench.models.lora import (
    add_lora,
    load_lora_factors,
    projector,
    projector_weights,
    set_projector_weights,
)
from cl_bench.models.routed_lora import RoutedModule, Routing, route_modules
from cl_bench.registry import register_method
from cl_bench.running.training import train_model
from methods.mr_lora.router import chosen_expert, router_samples, routing_question

ROUTER = "router"


@dataclass
class MRLoRAOptions:
    """MR-LoRA's options (defaults: the reference scripts)."""

    rank: int | None = None
    """Rank of each task's expert LoRA; None: the run's lora.rank (reference 128)."""
    router_rank: int | None = None
    """Rank of the router LoRA; None: the expert rank (reference 128)."""
    router_samples: int = 20
    """Router-set samples per learned task (reference router file: Router_train20)."""
    router_lr: float = 5e-6
    """Router learning rate (reference 0_train_router.sh: 5e-6)."""
    router_epochs: float = 40.0
    """Router epochs over the router set (reference: 40)."""
    router_max_new_tokens: int = 16
    """Tokens the router may generate before its answer is read (reference default: 16)."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("rank", "router_rank"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"method.{name}={getattr(self, name)}: must be >= 1")
        for name in ("router_samples", "router_max_new_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"method.{name}={getattr(self, name)}: must be >= 1")
        if self.router_lr <= 0:
            problems.append(f"method.router_lr={self.router_lr}: must be > 0")
        if self.router_epochs <= 0:
            problems.append(f"method.router_epochs={self.router_epochs}: must be > 0")
        if problems:
            raise CLBenchError("; ".join(problems))


@dataclass
class Expert:
    """A LoRA with its own projector: one task's expert, or the router."""

    name: str
    lora: dict[str, LoraFactors]
    projector: dict[str, torch.Tensor]

    def save(self, path: Path) -> None:
        tensors = {f"projector::{n}": t for n, t in self.projector.items()}
        save_lora_file(path, self.lora, tensors, {"name": self.name})

    @classmethod
    def load(cls, path: Path) -> Expert:
        lora, tensors, meta = load_lora_file(path)
        weights = {k.removeprefix("projector::"): t for k, t in tensors.items()
                   if k.startswith("projector::")}
        return cls(meta["name"], lora, weights)


@register_method(
    "mr_lora",
    paper="MR-LoRA: Zhao et al., MLLM-CL (2025), expert LoRAs + MLLM router LoRA",
    trains="a fresh expert LoRA + projector per task from the starting model; the router LoRA + "
    "projector on a small router set of every learned task",
    growth="one expert LoRA + one projector; method.router_samples training samples kept for "
    "the router set",
    routes=True,
)
class MRLoRA(Method):
    """MR-LoRA: an isolated LoRA expert per task, selected per sample by a router LoRA."""

    Options = MRLoRAOptions

    def __init__(self, options: MRLoRAOptions, context: MethodContext) -> None:
        super().__init__(options, context)
        self.start_projector = projector_weights(context.bundle.model)  # before any training
        self.experts: list[Expert] = []
        self.tasks: list[Stage] = []
        self.router: Expert | None = None
        self.routing = Routing()
        self.image_routing = Routing()
        self.counts = RoutingCounts([])
        self.fallbacks = 0
        self.rng = random.Random(context.config.seed)

    def _lora(self, rank: int | None):
        lora = self.context.config.lora
        return lora if rank is None else dataclasses.replace(lora, rank=rank)

    # -- training ----------------------------------------------------------------------------
    def before_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        """A fresh expert on the starting model and projector (``after_stage`` leaves them)."""
        return add_lora(model, self._lora(self.options.rank))

    def after_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        """Keep the expert, fine-tune the router on the router set of every learned task, and
        return the starting model with the starting projector."""
        expert = Expert(stage.name, stage_delta(model, {}).lora, projector_weights(model))
        self.experts = [*self.experts[: stage.index - 1], expert]
        self.tasks = [*self.tasks[: stage.index - 1], stage]
        plain = model.unload()
        self.router = self.train_router(plain, stage.index)
        set_projector_weights(plain, self.start_projector)
        return plain

    def train_router(self, plain: torch.nn.Module, stage: int) -> Expert:
        """The router LoRA and projector, continued from the last stage's, on the router set."""
        ctx, o = self.context, self.options
        learned = [(s.name, self.training_samples(s)) for s in self.tasks]
        samples = router_samples(learned, o.router_samples, ctx.config.seed)
        set_projector_weights(plain, self.router.projector if self.router else self.start_projector)
        model = add_lora(plain, self._lora(o.router_rank or o.rank))
        if self.router is not None:
            load_lora_factors(model, self.router.lora)
        cfg = dataclasses.replace(ctx.config.train, learning_rate=o.router_lr,
                                  epochs=o.router_epochs, limit=None)
        train_model(model, ctx.bundle, samples, cfg, ctx.run_dir / "trainer_router",
                    ctx.config.seed + stage)
        router = Expert(ROUTER, stage_delta(model, {}).lora, projector_weights(model))
        model.unload()
        return router

    # -- evaluation --------------------------------------------------------------------------
    def eval_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The starting model with every expert and the router, one routed per sample."""
        if not self.experts:
            return model
        pool = [*self.experts, self.router]
        self.routing, self.image_routing = Routing(), Routing()
        self.counts = RoutingCounts([e.name for e in self.experts])
        self.fallbacks, self.rng = 0, random.Random(self.context.config.seed)
        routed, self.lora_parameters = route_modules(model, [e.lora for e in pool], self.routing)
        projectors = []
        for expert in pool:
            copied = copy.deepcopy(projector(model))
            copied.load_state_dict(expert.projector)
            projectors.append(copied)
        name = next(n for n, _ in routed.named_modules() if n.endswith("multi_modal_projector"))
        routed.set_submodule(name, RoutedModule(projectors, self.image_routing))
        return routed

    def before_generate(
        self, model: torch.nn.Module, prompts: Sequence[tuple[str, Image.Image | None]],
        label: str,
    ) -> None:
        """Stage 1: the router picks an expert per sample; stage 2 (the runner's generation)
        runs each sample on its expert."""
        if not self.experts:
            return
        names = [e.name for e in self.experts]
        router_index = len(self.experts)
        self._select(model, [router_index] * len(prompts), prompts)
        questions = [(routing_question(q, names), image) for q, image in prompts]
        answers = generate_texts(model, self.context.bundle, questions, len(prompts),
                                 self.options.router_max_new_tokens, "routing")
        chosen = []
        for answer in answers:
            index, valid = chosen_expert(answer, len(names), self.rng)
            chosen.append(index)
            self.fallbacks += not valid
        self._select(model, chosen, prompts)
        self.counts.add(label, chosen)

    def _select(self, model: torch.nn.Module, chosen: list[int],
                prompts: Sequence[tuple[str, Image.Image | None]]) -> None:
        """One-hot routing: sample i (and its image, if any) on expert ``chosen[i]``."""
        device = next(model.parameters()).device
        weights = torch.nn.functional.one_hot(torch.tensor(chosen), len(self.experts) + 1)
        self.routing.weights = weights.float().to(device)
        with_image = [i for i, (_, image) in enumerate(prompts) if image is not None]
        self.image_routing.weights = weights[with_image].float().to(device)

    def after_evaluation(self, stage: Stage) -> dict:
        info: dict = {"experts": len(self.experts), "router_fallbacks": self.fallbacks}
        if self.experts:
            info["parameters"] = {
                "lora": self.lora_parameters,
                "projectors": sum(t.numel() for e in [*self.experts, self.router]
                                  for t in e.projector.values()),
            }
        if self.counts:
            info["routing_accuracy"] = self.counts.write(self.context.run_dir, stage.index)
        return info

    # -- checkpoints -------------------------------------------------------------------------
    def save(self, model: torch.nn.Module, folder: Path) -> None:
        super().save(model, folder)
        for i, expert in enumerate(self.experts, start=1):
            expert.save(folder / "mr_lora" / f"expert_{i}.safetensors")
        if self.router is not None:
            self.router.save(folder / "mr_lora" / "router.safetensors")

    def load(self, folder: Path) -> torch.nn.Module:
        model = super().load(folder)
        stored = folder / "mr_lora"
        self.experts = [Expert.load(stored / f"expert_{i}.safetensors")
                        for i in range(1, len(self.tasks) + 1)]
        self.router = Expert.load(stored / "router.safetensors")
        return model

    def state(self) -> dict:
        return {"tasks": [[t.name for t in s.tasks] for s in self.tasks]}

    def load_state(self, state: dict) -> None:
        suite = self.context.suite
        self.tasks = [Stage(i, tuple(suite.task(name) for name in names))
                      for i, names in enumerate(state.get("tasks", []), start=1)]
