"""EWC: Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017) on one carried LoRA.

After each stage the diagonal Fisher of the trainable parameters (the LoRA factors and the
projector) is estimated on that stage's training data and added to the Fisher of the earlier
stages; the next stages add lambda/2 * sum_i F_i (theta_i - theta*_i)^2 to the LLaVA loss, theta*
being the parameters after the last stage (EWC eq. 3, with the Fisher accumulated over tasks).
Only the trainable parameters are involved: the Fisher is kept in fp32 and the anchor theta* in
the parameters' dtype, both on the parameters' device. Checked against Continual-NExT
``swift/trainers/trainers.py`` (``ewc_after_train``: squared gradients of the training loss on up
to ``EWC_limit`` samples; ``compute_ewc_loss``: EWC_lambda * F * (p - p*)^2).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from cl_bench.errors import CLBenchError
from cl_bench.method import Stage
from cl_bench.models.batching import training_batches
from cl_bench.registry import register_method
from methods.seq_lora import SeqLoRA, evaluation_mode, trainable_parameters

Tensors = dict[str, torch.Tensor]


@dataclass
class EWCOptions:
    """EWC options (defaults from Continual-NExT's EWC)."""

    ewc_lambda: float = 1.0
    """lambda of the penalty lambda/2 sum F (theta - theta*)^2 (EWC eq. 3); 1.0 is
    Continual-NExT's EWC_lambda = 0.5, which multiplies F (p - p*)^2 without the 1/2."""
    fisher_batches: int = 1000
    """Batches of the stage's training data the Fisher is estimated on (at most the stage's
    samples; Continual-NExT's EWC_limit: 1000 samples)."""
    fisher_batch_size: int = 1
    """Samples per Fisher batch: 1 gives the empirical Fisher, the mean of per-sample squared
    gradients; larger batches are faster and square each batch's mean gradient instead."""

    def __post_init__(self) -> None:
        if not self.ewc_lambda >= 0:
            raise CLBenchError(f"method.ewc_lambda={self.ewc_lambda}: must be >= 0")
        for key in ("fisher_batches", "fisher_batch_size"):
            if getattr(self, key) < 1:
                raise CLBenchError(f"method.{key}={getattr(self, key)}: must be >= 1")


def fisher_diagonal(
    model: torch.nn.Module, batches: Iterable[dict], params: dict[str, torch.nn.Parameter]
) -> Tensors:
    """Diagonal Fisher of ``params``: the mean over ``batches`` of the squared gradient of the
    model's loss (fp32, on each parameter's device)."""
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count = 0
    with torch.enable_grad():
        for batch in batches:
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            for name, p in params.items():
                if p.grad is not None:
                    fisher[name] += p.grad.float().pow(2)  # F_i (Continual-NExT ewc_after_train)
            count += 1
    model.zero_grad(set_to_none=True)
    if count == 0:
        raise CLBenchError("EWC: no training batch to estimate the Fisher on")
    return {name: f / count for name, f in fisher.items()}


def ewc_penalty(params: dict[str, torch.Tensor], fisher: Tensors, anchor: Tensors,
                strength: float) -> torch.Tensor:
    """lambda/2 * sum_i F_i (theta_i - theta*_i)^2 over ``params`` (EWC eq. 3), in fp32."""
    total = sum(
        (fisher[name] * (p.float() - anchor[name].float()).pow(2)).sum()
        for name, p in params.items()
    )
    return strength / 2 * total  # EWC eq. 3 (Continual-NExT compute_ewc_loss drops the 1/2)


@register_method(
    "ewc",
    # the Fisher is its own backward after training, which ZeRO-2's gradient partitioning
    # would take over
    launchers=("single", "ddp"),
    paper="EWC (Kirkpatrick et al., PNAS 2017), eq. 3; a baseline of HiDe-LLaVA Tables 1-2 "
          "and LLaVA-c Table 2 / Fig. 7",
    trains="one LoRA on the language model + the projector, carried across stages "
           "(as seq_lora), penalised by the accumulated Fisher",
    growth="none (one fp32 Fisher and one anchor of the trainable parameters)",
)
class EWC(SeqLoRA):
    """Sequential LoRA + the EWC penalty of the Fisher accumulated over the earlier stages."""

    Options = EWCOptions

    def __init__(self, options: EWCOptions, context) -> None:
        super().__init__(options, context)
        self.fisher: Tensors = {}
        self.anchor: Tensors = {}
        self.params: dict[str, torch.nn.Parameter] = {}

    def before_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        model = super().before_stage(model, stage)
        self.params = trainable_parameters(model)
        missing = sorted(set(self.fisher) - set(self.params))
        if missing:
            raise CLBenchError(f"EWC: the Fisher holds {missing[0]!r}, which no longer trains")
        return model

    def extra_losses(self, model: torch.nn.Module, inputs: dict, outputs) -> dict:
        if not self.fisher:
            return {}
        params = {name: self.params[name] for name in self.fisher}
        return {"ewc": ewc_penalty(params, self.fisher, self.anchor, self.options.ewc_lambda)}

    def after_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        """Estimate this stage's Fisher, add it to the earlier ones; anchor at theta*."""
        samples = self._fisher_samples(stage)
        device = next(iter(self.params.values())).device
        cfg = self.context.config
        batches = training_batches(samples, self.context.bundle, self.options.fisher_batch_size,
                                   cfg.train.max_length, device)
        total = -(-len(samples) // self.options.fisher_batch_size)
        with evaluation_mode(model):
            stage_fisher = fisher_diagonal(
                model, tqdm(batches, total=total, desc="EWC Fisher", leave=False), self.params)
        for name, value in stage_fisher.items():
            self.fisher[name] = self.fisher[name] + value if name in self.fisher else value
        self.anchor = {name: p.detach().clone() for name, p in self.params.items()}
        return super().after_stage(model, stage)

    def _fisher_samples(self, stage: Stage) -> list:
        """A seeded subset of the stage's training samples, fisher_batches batches' worth."""
        samples = self.training_samples(stage)
        wanted = self.options.fisher_batches * self.options.fisher_batch_size
        rng = random.Random(f"ewc:{self.context.config.seed}:{stage.index}")
        return rng.sample(samples, min(wanted, len(samples)))

    # -- checkpoints ------------------------------------------------------------------------
    def save(self, model: torch.nn.Module, folder: Path) -> None:
        super().save(model, folder)
        tensors = {f"fisher::{n}": t for n, t in self.fisher.items()}
        tensors |= {f"anchor::{n}": t for n, t in self.anchor.items()}
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                  str(folder / "ewc.safetensors"))

    def load(self, folder: Path) -> torch.nn.Module:
        model = super().load(folder)
        path = folder / "ewc.safetensors"
        if not path.is_file():
            raise CLBenchError(f"{path} is missing: EWC resumes from its Fisher and anchor")
        params = dict(model.named_parameters())
        with safe_open(str(path), "pt") as f:
            for key in f.keys():  # noqa: SIM118
                kind, name = key.split("::", 1)
                if name not in params:
                    raise CLBenchError(f"{path}: {name!r} is no parameter of the model")
                target = self.fisher if kind == "fisher" else self.anchor
                target[name] = f.get_tensor(key).to(params[name].device)
        # in the model's parameter order, as after an uninterrupted stage: the penalty sums in
        # the same order, so a resumed run logs the same numbers
        self.fisher = {n: self.fisher[n] for n in params if n in self.fisher}
        self.anchor = {n: self.anchor[n] for n in params if n in self.anchor}
        return model
