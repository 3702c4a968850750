"""LLaVA-c: spectral-aware consolidation (SAC) + unsupervised inquiry regularization (UIR).

LLaVA-c (Algorithm 1): each stage trains a fresh LoRA (and the projector) from the consolidated
model with L = L_llava + L_uir, then consolidates the update with SAC and merges it. ModelMix
and the paper's ablations (Table 4, Figure 9) are the same method with other options
(``variants.yaml``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cl_bench.errors import CLBenchError
from cl_bench.evaluation.generation import generate_answers
from cl_bench.method import Method, Stage
from cl_bench.models.batching import collate_batch, prompt_item
from cl_bench.models.deltas import LoraFactors, delta_path, snapshot_trainable, stage_delta
from cl_bench.models.placement import to_model
from cl_bench.models.updates import apply_delta
from cl_bench.registry import register_method
from methods.llava_c.consolidation import (
    apply_sac,
    check_alpha,
    lora_spectrum,
    modelmix_delta,
    sac_delta,
)
from methods.llava_c.spectra import write_spectra
from tasks.loaders import Sample, load_samples

CONSOLIDATIONS = ("sac", "modelmix", "none")
REGULARIZERS = ("mse", "l2", "fkl", "replay", "none")


@dataclass
class LlavaCOptions:
    """alpha: mix ratio; consolidation: sac|modelmix|none; uir: mse|l2|fkl|replay|none."""

    alpha: float = 0.2
    """The mix ratio alpha in [0, 1] (eq. 4-7; LLaVA-c: 0.2)."""
    consolidation: str = "sac"
    """sac (eq. 5-7), modelmix (eq. 4: alpha * delta) or none (plain merge)."""
    boundary: str = "pad"
    """SAC's window past the last singular value: pad with it (footnote 2) or truncate
    (Algorithm 1)."""
    uir: str = "mse"
    """The regularizer while training: mse or l2 (eq. 8-9), fkl (forward KL, Fig. 9), replay
    (inquiries with the previous model's answers, Fig. 9) or none."""
    inquiry_file: str | None = None
    """UIR's unlabeled text-only inquiries (a JSON list of {id, text}; None: the suite's)."""
    inquiry_batch: int = 0
    """Inquiries per training step (0: the training batch size)."""


Update = LoraFactors | torch.Tensor
AtAlpha = Callable[[float], Update]


def consolidator(consolidation: str, boundary: str) -> Callable[[Update], AtAlpha]:
    """update -> (alpha -> its consolidated update), in float32: a LoRA stays factors (and is
    decomposed once for all alphas), a full update stays a tensor."""
    if consolidation not in CONSOLIDATIONS:
        raise CLBenchError(f"consolidation {consolidation!r}: expected one of {CONSOLIDATIONS}")

    def for_update(update: Update) -> AtAlpha:
        if isinstance(update, LoraFactors):
            update = LoraFactors(update.B.float(), update.A.float(), update.scaling)
            if consolidation == "sac":
                spectrum = lora_spectrum(update.B, update.A, update.scaling)

                def factored(alpha: float) -> LoraFactors:
                    P, Q = apply_sac(spectrum, alpha, boundary)
                    return LoraFactors(P, Q, 1.0)  # LLaVA-c eq. 5-7, factored path

                return factored
            if consolidation == "modelmix":  # LLaVA-c eq. 4 on the factors: alpha * s * B A
                return lambda alpha: LoraFactors(update.B, update.A,
                                                 check_alpha(alpha) * update.scaling)
            return lambda alpha: update
        full = update.float()
        if consolidation == "sac":
            return lambda alpha: sac_delta(full, alpha, boundary)  # LLaVA-c eq. 5-7, full SVD
        if consolidation == "modelmix":
            return lambda alpha: modelmix_delta(full, alpha)  # LLaVA-c eq. 4
        return lambda alpha: full

    return for_update


def hidden_distance(current: torch.Tensor, previous: torch.Tensor, mask: torch.Tensor,
                    kind: str) -> torch.Tensor:
    """UIR distance over non-padding positions (LLaVA-c eq. 8): MSE, or mean per-token L2;
    summed in float32 whatever the activations' dtype."""
    current, previous = current.float(), previous.float()
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


@register_method(
    "llava_c",
    paper="LLaVA-c (Liu et al., 2025), eq. 4-9, Algorithm 1",
    trains="a fresh LoRA on the language model + the projector each stage, SAC-merged after it",
    growth="none in memory; each stage's raw update is stored on disk (deltas/) for alpha sweeps",
    # LLaVA-c appendix A.1, Table 6: LoRA R 128, alpha 256 (LLaVA-1.5's LoRA setting)
    recipe={"lora.rank": 128, "lora.alpha": 256.0},
)
class LlavaC(Method):
    """LLaVA-c: UIR while training, spectral-aware consolidation after each stage."""

    Options = LlavaCOptions

    def __init__(self, options: LlavaCOptions, context) -> None:
        super().__init__(options, context)
        if options.uir not in REGULARIZERS:
            raise CLBenchError(f"method.uir={options.uir!r}: expected one of {REGULARIZERS}")
        check_alpha(options.alpha)
        self.consolidator = consolidator(options.consolidation, options.boundary)
        self.before: dict[str, torch.Tensor] = {}
        self.uir_seed: int | None = None  # set while a stage trains with UIR
        self.uir_step = 0  # inquiry batches drawn this stage (saved mid-stage: exact resume)
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

    def inquiry_batch(self, seed: int, step: int) -> dict:
        """The ``step``-th inquiry batch of a stage: a fixed shuffle per seed, cycled, so that
        a resumed stage draws the batches an uninterrupted one would have."""
        bundle = self.context.bundle
        size = self.options.inquiry_batch or self.context.config.train.batch_size
        order = list(range(len(self.inquiries())))
        random.Random(seed).shuffle(order)
        starts = range(0, len(order), size)
        start = starts[step % len(starts)]
        items = [prompt_item(bundle, self.inquiries()[i].question, None)
                 for i in order[start : start + size]]
        return collate_batch(items, bundle)

    # -- hooks ------------------------------------------------------------------------------
    def before_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        if self.options.uir == "replay":
            self.replay = self._replay_samples(model)
        model = super().before_stage(model, stage)
        self.before = snapshot_trainable(model)
        if self.options.uir in ("mse", "l2", "fkl"):
            self.uir_seed, self.uir_step = self.context.config.seed + stage.index, 0
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
        if self.uir_seed is None:
            return {}
        batch = to_model(self.inquiry_batch(self.uir_seed, self.uir_step), model)
        self.uir_step += 1
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
        delta.save(delta_path(self.context.run_dir, stage.index))
        opts = self.options
        write_spectra(self.context.run_dir, stage.index, delta, opts.consolidation, opts.alpha,
                      opts.boundary)
        plain = model.unload()
        apply_delta(plain, delta, lambda u: self.consolidation(u)(None), base=self.before)
        self.uir_seed = None
        return plain

    def consolidation(self, update: Update) -> Callable[[float | None], Update]:
        """alpha (None: the run's ``method.alpha``) -> the consolidated update."""
        at = self.consolidator(update)
        return lambda alpha=None: at(check_alpha(self.options.alpha if alpha is None else alpha))

    def state(self) -> dict:
        return {"uir_step": self.uir_step}

    def load_state(self, state: dict) -> None:
        self.uir_step = int(state.get("uir_step", 0))
