"""LLaVA-c: spectral-aware consolidation (SAC) + unsupervised inquiry regularization (UIR).

LLaVA-c (Algorithm 1): each stage trains a fresh LoRA (and the projector) from the consolidated
model with L = L_llava + L_uir, then consolidates the update with SAC and merges it. ModelMix
and the paper's ablations (Table 4, Figure 9) are the same method with other options.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from cl_bench.consolidation import check_alpha, modelmix_delta, sac_delta, sac_lora_factors
from cl_bench.deltas import LoraFactors, StageDelta, apply_delta, snapshot_trainable, stage_delta
from cl_bench.errors import CLBenchError
from cl_bench.evaluation import generate_answers
from cl_bench.method import Method, Stage
from cl_bench.registry import register_method
from cl_bench.spectra import write_spectra
from cl_bench.training import collate_batch, prompt_item
from tasks.loaders import Sample, load_samples

CONSOLIDATIONS = ("sac", "modelmix", "none")
REGULARIZERS = ("mse", "l2", "fkl", "replay", "none")


@dataclass
class LlavaCOptions:
    """alpha: mix ratio; consolidation: sac|modelmix|none; uir: mse|l2|fkl|replay|none."""

    alpha: float = 0.2
    consolidation: str = "sac"
    boundary: str = "pad"
    uir: str = "mse"
    inquiry_file: str | None = None
    inquiry_batch: int = 0


def consolidator(consolidation: str, alpha: float, boundary: str):
    """The function mapping a raw update (LoRA factors or tensor) to its consolidated delta."""
    check_alpha(alpha)
    if consolidation not in CONSOLIDATIONS:
        raise CLBenchError(f"consolidation {consolidation!r}: expected one of {CONSOLIDATIONS}")

    def consolidate(update: LoraFactors | torch.Tensor) -> torch.Tensor:
        if consolidation == "none":
            return update.product() if isinstance(update, LoraFactors) else update
        if consolidation == "modelmix":
            full = update.product() if isinstance(update, LoraFactors) else update
            return modelmix_delta(full, alpha)  # LLaVA-c eq. 4
        if isinstance(update, LoraFactors):
            P, Q = sac_lora_factors(update.B, update.A, update.scaling, alpha, boundary)
            return P @ Q  # LLaVA-c eq. 5-7, factored path
        return sac_delta(update, alpha, boundary)  # LLaVA-c eq. 5-7, full SVD path

    return consolidate


def hidden_distance(current: torch.Tensor, previous: torch.Tensor, mask: torch.Tensor,
                    kind: str) -> torch.Tensor:
    """UIR distance over non-padding positions (LLaVA-c eq. 8): MSE, or mean per-token L2."""
    m = mask.unsqueeze(-1).to(current.dtype)
    diff = (current - previous) * m
    if kind == "mse":
        return diff.pow(2).sum() / (m.sum() * current.shape[-1])
    return diff.pow(2).sum(-1).clamp_min(1e-12).sqrt().sum() / m.sum()


def forward_kl(current_logits: torch.Tensor, previous_logits: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
    """KL(p_previous || p_current) per token, averaged over non-padding positions (Fig. 9 FKL)."""
    log_p = torch.log_softmax(previous_logits.float(), -1)
    log_q = torch.log_softmax(current_logits.float(), -1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    return (per_token * mask).sum() / mask.sum()


@register_method("llava_c")
class LlavaC(Method):
    """LLaVA-c: UIR while training, spectral-aware consolidation after each stage."""

    Options = LlavaCOptions

    def __init__(self, options: LlavaCOptions, context) -> None:
        super().__init__(options, context)
        if options.uir not in REGULARIZERS:
            raise CLBenchError(f"method.uir={options.uir!r}: expected one of {REGULARIZERS}")
        self.consolidate = consolidator(options.consolidation, options.alpha, options.boundary)
        self.before: dict[str, torch.Tensor] = {}
        self.inquiry_batches: Iterator[dict] | None = None
        self._inquiries: list[Sample] | None = None

    # -- inquiries ---------------------------------------------------------------------------
    def inquiries(self) -> list[Sample]:
        """The unlabeled text-only inquiry set (the suite's, or ``method.inquiry_file``)."""
        if self._inquiries is None:
            ctx = self.context
            path = (
                ctx.data_root / self.options.inquiry_file if self.options.inquiry_file
                else ctx.suite_file(ctx.suite.inquiry_file, "inquiry (UIR)")
            )
            self._inquiries = [s for s in load_samples(path, path.parent) if s.image is None]
            if not self._inquiries:
                raise CLBenchError(f"{path}: no text-only inquiries for UIR")
        return self._inquiries

    def _batches(self, seed: int) -> Iterator[dict]:
        bundle = self.context.bundle
        size = self.options.inquiry_batch or self.context.config.train.batch_size
        order = list(range(len(self.inquiries())))
        random.Random(seed).shuffle(order)
        for start in itertools.cycle(range(0, len(order), size)):
            items = [
                prompt_item(bundle, self.inquiries()[i].question, None)
                for i in order[start : start + size]
            ]
            yield collate_batch(items, bundle)

    # -- hooks ------------------------------------------------------------------------------
    def before_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        if self.options.uir == "replay":
            self.replay = self._replay_samples(model)
        model = super().before_stage(model, stage)
        self.before = snapshot_trainable(model)
        if self.options.uir in ("mse", "l2", "fkl"):
            self.inquiry_batches = self._batches(self.context.config.seed + stage.index)
        return model

    def _replay_samples(self, model: torch.nn.Module) -> list[Sample]:
        """Inquiries with synthetic targets: the previous model's own greedy answers."""
        cfg = self.context.config
        answers = generate_answers(model, self.context.bundle, self.inquiries(),
                                   cfg.eval.batch_size, cfg.eval.max_new_tokens, "replay targets")
        return [Sample(s.id, ((s.question, answers[s.id]),)) for s in self.inquiries()]

    def training_samples(self, stage: Stage) -> list[Sample]:
        samples = super().training_samples(stage)
        return samples + self.replay if self.options.uir == "replay" else samples

    def extra_losses(self, model: torch.nn.Module, inputs: dict, outputs) -> dict:
        if self.inquiry_batches is None:
            return {}
        batch = next(self.inquiry_batches)
        batch.pop("labels", None)
        current = model(**batch, output_hidden_states=True)
        with torch.no_grad(), model.disable_adapter():
            previous = model(**batch, output_hidden_states=True)
        mask = batch["attention_mask"]
        if self.options.uir == "fkl":
            return {"uir": forward_kl(current.logits, previous.logits, mask)}
        return {"uir": hidden_distance(  # LLaVA-c eq. 8-9: L = L_llava + L_uir
            current.hidden_states[-1], previous.hidden_states[-1], mask, self.options.uir
        )}

    def after_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        """Store the raw update, then merge its consolidated version (Algorithm 1)."""
        delta = stage_delta(model, self.before)
        delta.save(self.context.run_dir / "deltas" / f"stage_{stage.index}.safetensors")
        opts = self.options
        write_spectra(self.context.run_dir, stage.index, delta, opts.consolidation, opts.alpha,
                      opts.boundary)
        plain = model.unload()
        apply_delta(plain, delta, self.consolidate, base=self.before)
        self.inquiry_batches = None
        return plain


@dataclass
class ModelMixOptions(LlavaCOptions):
    consolidation: str = "modelmix"
    uir: str = "none"


@register_method("modelmix")
class ModelMix(LlavaC):
    """ModelMix: uniform alpha on each stage's update (LLaVA-c eq. 4), no UIR."""

    Options = ModelMixOptions


@dataclass
class SacOnlyOptions(LlavaCOptions):
    uir: str = "none"


@register_method("llava_c_sac")
class LlavaCSacOnly(LlavaC):
    """LLaVA-c ablation '+SAC' (Table 4): SAC consolidation without UIR."""

    Options = SacOnlyOptions


@dataclass
class UirOnlyOptions(LlavaCOptions):
    consolidation: str = "none"


@register_method("llava_c_uir")
class LlavaCUirOnly(LlavaC):
    """LLaVA-c ablation '+UIR' (Table 4): UIR while training, plain merge (no mixing)."""

    Options = UirOnlyOptions


@dataclass
class ReplayOptions(LlavaCOptions):
    uir: str = "replay"


@register_method("llava_c_replay")
class LlavaCReplay(LlavaC):
    """LLaVA-c ablation 'data-replay' (Fig. 9): inquiries with synthetic labels, plus SAC."""

    Options = ReplayOptions


@dataclass
class ForwardKLOptions(LlavaCOptions):
    uir: str = "fkl"


@register_method("llava_c_fkl")
class LlavaCForwardKL(LlavaC):
    """LLaVA-c ablation 'FKL' (Fig. 9): forward KL on inquiry logits instead of MSE, plus SAC."""

    Options = ForwardKLOptions


def stored_delta(run_dir, stage: int) -> StageDelta:
    """The raw update a llava_c-family run stored for ``stage``."""
    path = run_dir / "deltas" / f"stage_{stage}.safetensors"
    if not path.exists():
        raise CLBenchError(
            f"{run_dir}: no stored delta for stage {stage} ({path.name}); only llava_c-family "
            "runs (llava_c, modelmix, ablations) store their raw updates"
        )
    return StageDelta.load(path)
