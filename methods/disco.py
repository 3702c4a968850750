"""DISCO (Guo et al., "Federated Continual Instruction Tuning", ICCV 2025): one LoRA subspace per
task, the subspaces activated per sample at inference by the instruction's text feature.

Dynamic Knowledge Organization (DKO), training: a stage's identity token is the mean CLIP text
feature of its training instructions. It trains its own LoRA subspace on the base model (the
other subspaces take no part); with a matching threshold tau, a stage whose token matches an
earlier subspace's (cosine >= tau) continues that subspace instead, and the token becomes the
sample-weighted mean of both. Subspace Selective Activation (SSA), inference: the LoRA update is
B-bar diag(alpha_1 I, ..., alpha_T I) A-bar = sum_i alpha_i B_i A_i with alpha = softmax(s / eps),
s_i = cos(text feature of the sample's instruction, identity token i).

The paper's federated rounds (clients, server aggregation) reduce to one client per stage here,
as in MCITlib's single-machine DISCO on UCIT. Reference code checked (facts only):
MCITlib DISCO/llava/model/llava_arch.py (tokens, softmax / 0.05),
DISCO/CoIN/peft/tuners/clitmoelora.py (one rank block per task, block-diagonal activation) and
FCIT ETrain/Fed_utils/model_aggregation.py (tau = 0.9, sample-weighted token aggregation).
Differences from the reference: docs/recent_methods.md.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from cl_bench.errors import CLBenchError
from cl_bench.evaluation.routing_counts import RoutingCounts
from cl_bench.method import Method, MethodContext, Stage
from cl_bench.models.deltas import LoraFactors, load_lora_file, save_lora_file, stage_delta
from cl_bench.models.encoders import TEXT_FEATURES, Encoder, suite_encoder
from cl_bench.models.lora import add_lora, load_lora_factors
from cl_bench.models.routed_lora import Routing, anchor_similarity, route_modules
from cl_bench.registry import register_method
from tasks.loaders import Sample


@dataclass
class DiscoOptions:
    """DISCO's options (defaults: the paper and MCITlib's UCIT configuration)."""

    rank: int | None = None
    """Rank of each task's subspace; None: the run's lora.rank (MCITlib UCIT: 96 / 6 = 16)."""
    temperature: float = 0.05
    """SSA softmax temperature eps (paper; reference llava_arch.py divides by 0.05)."""
    threshold: float | None = None
    """DKO matching threshold tau (paper: 0.9); None: a new subspace per task (MCITlib UCIT)."""
    encoder: str | None = None
    """Text encoder: a local CLIP folder, 'llava', or None for the suite's default encoder."""
    text_feature: str = "pooled"
    """CLIP text feature: 'pooled' (reference text tower output) or 'projected'."""
    token_samples: int | None = None
    """Training instructions averaged into an identity token (None: all of the stage's)."""
    encoder_batch: int = 64
    """Instructions encoded per batch."""

    def __post_init__(self) -> None:
        problems = []
        if self.temperature <= 0:
            problems.append(f"method.temperature={self.temperature}: must be > 0")
        if self.rank is not None and self.rank < 1:
            problems.append(f"method.rank={self.rank}: must be >= 1")
        if self.threshold is not None and not -1 < self.threshold <= 1:
            problems.append(f"method.threshold={self.threshold}: a cosine similarity in (-1, 1]")
        if self.token_samples is not None and self.token_samples < 1:
            problems.append(f"method.token_samples={self.token_samples}: must be >= 1 (or none)")
        if self.text_feature not in TEXT_FEATURES:
            problems.append(f"method.text_feature={self.text_feature!r}: expected one of "
                            f"{', '.join(TEXT_FEATURES)}")
        if self.encoder_batch < 1:
            problems.append(f"method.encoder_batch={self.encoder_batch}: must be >= 1")
        if problems:
            raise CLBenchError("; ".join(problems))


# -- the core terms ------------------------------------------------------------------------------
def activation_factors(similarities: torch.Tensor, temperature: float) -> torch.Tensor:
    """SSA activation factors (B x T): alpha_i = exp(s_i / eps) / sum_j exp(s_j / eps)."""
    return torch.softmax(similarities.float() / temperature, dim=-1)  # DISCO SSA, alpha_i


def matching_subspace(
    token: torch.Tensor, tokens: list[torch.Tensor], threshold: float | None
) -> int | None:
    """DKO: the subspace whose identity token the new one matches (cosine >= tau, the most
    similar one), or None for a new subspace (model_aggregation.py, ``>= threshold``)."""
    if threshold is None or not tokens:
        return None
    sims = anchor_similarity(token.unsqueeze(0), torch.stack(tokens))[0]
    best = int(sims.argmax())
    return best if float(sims[best]) >= threshold else None


def merged_token(
    token: torch.Tensor, samples: int, new: torch.Tensor, new_samples: int
) -> torch.Tensor:
    """DKO sample-weighted aggregation of two identity tokens (model_aggregation.py)."""
    return (token * samples + new * new_samples) / (samples + new_samples)


# -- subspaces -----------------------------------------------------------------------------------
@dataclass
class Subspace:
    """One LoRA subspace: its factors, identity token, and the tasks and samples behind it."""

    tasks: list[str]
    lora: dict[str, LoraFactors]
    token: torch.Tensor
    samples: int

    @property
    def name(self) -> str:
        return "+".join(self.tasks)

    def save(self, path: Path) -> None:
        meta = {"tasks": "\n".join(self.tasks), "samples": str(self.samples)}
        save_lora_file(path, self.lora, {"identity_token": self.token}, meta)

    @classmethod
    def load(cls, path: Path) -> Subspace:
        lora, tensors, meta = load_lora_file(path)
        if "identity_token" not in tensors:
            raise CLBenchError(f"{path} is not a DISCO subspace file (no identity token)")
        return cls(meta["tasks"].split("\n"), lora, tensors["identity_token"], int(meta["samples"]))


@register_method(
    "disco",
    paper="DISCO: Guo et al., Federated Continual Instruction Tuning (ICCV 2025), DKO + SSA",
    trains="one LoRA subspace per task on the base model (or a matching earlier one, continued) "
    "+ the shared projector",
    growth="one LoRA subspace (rank method.rank) + one identity token (text-feature size)",
    routes=True,
)
class Disco(Method):
    """DISCO: a LoRA subspace per task, activated per sample by instruction-feature similarity."""

    Options = DiscoOptions

    def __init__(self, options: DiscoOptions, context: MethodContext) -> None:
        super().__init__(options, context)
        self.encoder: Encoder = suite_encoder(options.encoder, context, options.text_feature,
                                              "disco")
        self.subspaces: list[Subspace] = []
        self.pending: tuple[int | None, torch.Tensor, int] | None = None
        self.routing = Routing()
        self.counts = RoutingCounts([])
        self.lora_parameters = 0

    # -- training ----------------------------------------------------------------------------
    def before_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        """The stage's identity token, its subspace (DKO) and a LoRA for it on the base model."""
        samples = self.training_samples(stage)
        token = self.identity_token(samples, stage.index)
        match = matching_subspace(token, [s.token for s in self.subspaces], self.options.threshold)
        self.pending = (match, token, len(samples))
        lora = self.context.config.lora
        if self.options.rank is not None:
            lora = dataclasses.replace(lora, rank=self.options.rank)
        model = add_lora(model, lora)
        if match is not None:
            load_lora_factors(model, self.subspaces[match].lora)
        return model

    def identity_token(self, samples: list[Sample], seed: int) -> torch.Tensor:
        """Mean text feature of the stage's training instructions (DKO identity token)."""
        limit = self.options.token_samples
        if limit is not None and len(samples) > limit:
            samples = random.Random(seed).sample(samples, limit)
        total = None
        step = self.options.encoder_batch
        for start in range(0, len(samples), step):
            feats = self.encoder.text_features([s.question for s in samples[start : start + step]])
            total = feats.sum(0) if total is None else total + feats.sum(0)
        return total.cpu() / len(samples)

    def after_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        """Keep the trained subspace (new, or the matched one updated); return the base model."""
        lora = stage_delta(model, {}).lora
        plain = model.unload()
        match, token, samples = self.pending
        if match is None:
            self.subspaces.append(Subspace([stage.name], lora, token, samples))
        else:
            kept = self.subspaces[match]
            kept.token = merged_token(kept.token, kept.samples, token, samples)
            kept.samples += samples
            kept.tasks.append(stage.name)
            kept.lora = lora
        self.pending = None
        return plain

    # -- evaluation --------------------------------------------------------------------------
    def eval_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.subspaces:
            return model
        self.routing = Routing()
        self.counts = RoutingCounts([s.name for s in self.subspaces])
        routed, self.lora_parameters = route_modules(
            model, [s.lora for s in self.subspaces], self.routing)
        return routed

    def before_generate(
        self, model: torch.nn.Module, prompts: Sequence[tuple[str, Image.Image | None]],
        label: str,
    ) -> None:
        """SSA: each sample's activation factors from its instruction's text feature."""
        if not self.subspaces:
            return
        feats = self.encoder.text_features([question for question, _ in prompts]).cpu()
        sims = anchor_similarity(feats, torch.stack([s.token for s in self.subspaces]))
        alpha = activation_factors(sims, self.options.temperature)
        self.routing.weights = alpha.to(next(model.parameters()).device)
        self.counts.add(label, alpha.argmax(dim=1).tolist())

    def after_evaluation(self, stage: Stage) -> dict:
        info: dict = {"subspaces": len(self.subspaces), "encoder": self.encoder.description}
        if self.subspaces:
            info["parameters"] = {
                "lora": self.lora_parameters,
                "identity_tokens": sum(s.token.numel() for s in self.subspaces),
            }
        if self.counts:
            info["routing_accuracy"] = self.counts.write(self.context.run_dir, stage.index)
        return info

    # -- checkpoints -------------------------------------------------------------------------
    def save(self, model: torch.nn.Module, folder: Path) -> None:
        super().save(model, folder)
        for i, subspace in enumerate(self.subspaces):
            subspace.save(folder / "disco" / f"subspace_{i}.safetensors")

    def load(self, folder: Path) -> torch.nn.Module:
        model = super().load(folder)
        files = sorted((folder / "disco").glob("subspace_*.safetensors"),
                       key=lambda p: int(p.stem.removeprefix("subspace_")))
        if not files:
            raise CLBenchError(f"{folder / 'disco'}: no DISCO subspace files to resume from")
        self.subspaces = [Subspace.load(path) for path in files]
        return model

    def state(self) -> dict:
        return {"subspaces": [{"tasks": s.tasks, "samples": s.samples} for s in self.subspaces]}
