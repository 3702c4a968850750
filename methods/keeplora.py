"""KeepLoRA (Luo et al., "KeepLoRA: Continual Learning with Residual Gradient Adaptation",
ICLR 2026, arXiv 2601.19659): each task's LoRA learns in the residual subspace, orthogonal to
the principal subspace of the pre-trained weights and to the dominant gradient directions of the
earlier tasks.

Per adapted weight W (out x in) the method keeps an orthonormal basis M (k x in) of protected
input directions, as the authors' MCITlib release runs it on UCIT
(MaolinLuo/KeepLoRA ``MCITlib/KeepLoRA``, ``scripts/Train_UCIT/train_all.sh``):

- before the first task (``llava/train/extract_weights.py``): M = the top left singular vectors
  of W^T, as many as stay below ``weight_energy`` (0.6) of its squared singular values;
- before each task (``extract_gradients.py``, ``fixed_rank``): G, the mean over a share of the
  task's training samples of the loss gradient with respect to W, projected off M
  (``G^T - M^T M G^T``); the LoRA's A is the top-``rank`` left singular vectors of that
  (``svd_lowrank``), frozen, and B starts at zero and trains (``train.py``:
  ``--init_lora_from_gradients``, ``--freeze_lora_A``), with alpha = rank / 4;
- the LoRA is merged after the task; then (``energy``) the gradient on the merged model is
  projected off M again and M gains its top left singular vectors until M's share of the
  gradient's energy reaches ``feature_energy`` (0.99).

Only the paper's abstract and a summary could be read here, so the code cites the release's
files, not equation numbers. Differences from the release: docs/recent_methods.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from cl_bench.errors import CLBenchError
from cl_bench.method import Method, MethodContext, Stage
from cl_bench.models.batching import training_batches
from cl_bench.models.deltas import PEFT_PREFIX
from cl_bench.models.lora import add_lora, language_model_linears, merge_lora
from cl_bench.models.placement import device_of
from cl_bench.models.updates import effective_weight
from cl_bench.registry import register_method
from methods.seq_lora import evaluation_mode

SUBSPACE_FILE = "keeplora.safetensors"


@dataclass
class KeepLoRAOptions:
    """KeepLoRA (defaults: the release's UCIT scripts and configs). Dropout, targets and
    whether the projector trains come from the config's ``lora`` section."""

    rank: int | None = None
    """LoRA rank, the directions taken from each gradient (None: lora.rank; release: 32)."""
    alpha: float | None = None
    """LoRA alpha (None: rank / 4, the release's ``--lora_alpha $((RANK / 4))``)."""
    weight_energy: float = 0.6
    """Share of each pre-trained weight's energy its principal subspace stays below
    (``train_all.sh``: ``extract_weights.sh ... 0.6``)."""
    feature_energy: float = 0.99
    """Share of each task's gradient energy the grown subspace reaches (``train_post``
    configs: ``energy_threshold`` 0.99)."""
    gradient_ratio: float = 0.2
    """Share of a task's training samples the gradients are taken on, evenly spaced
    (``train_all.sh``: ``extract_gradients.sh ... 0.2``)."""
    gradient_batch_size: int = 1
    """Samples per gradient batch (release: 1, so the gradient sums per-sample ones)."""

    def __post_init__(self) -> None:
        problems = []
        if self.rank is not None and self.rank < 1:
            problems.append(f"method.rank={self.rank}: must be >= 1")
        if self.alpha is not None and self.alpha <= 0:
            problems.append(f"method.alpha={self.alpha}: must be > 0")
        for key in ("weight_energy", "feature_energy", "gradient_ratio"):
            if not 0.0 < getattr(self, key) <= 1.0:
                problems.append(f"method.{key}={getattr(self, key)}: must be in (0, 1]")
        if self.gradient_batch_size < 1:
            problems.append(f"method.gradient_batch_size={self.gradient_batch_size}: must be "
                            ">= 1")
        if problems:
            raise CLBenchError("; ".join(problems))


# -- the core terms (float32, on the weight's device) --------------------------------------------
def principal_subspace(weight: torch.Tensor, energy: float) -> torch.Tensor:
    """M (k x in): the top left singular vectors of W^T whose cumulative share of the squared
    singular values stays below ``energy``, at least one (``extract_weights.py``)."""
    u, s, _ = torch.linalg.svd(weight.float().T, full_matrices=False)
    share = torch.cumsum(s**2, 0) / (s**2).sum()
    k = max(int((share < energy).sum()), 1)
    return u[:, :k].T.contiguous()


def residual(gradient_t: torch.Tensor, subspace: torch.Tensor) -> torch.Tensor:
    """``G^T - M^T M G^T``: the gradient's input side projected off the protected subspace
    (``extract_gradients.py``, both modes)."""
    return gradient_t - subspace.T @ (subspace @ gradient_t)


def lora_a_init(gradient: torch.Tensor, subspace: torch.Tensor, rank: int,
                seed: int) -> torch.Tensor:
    """A (rank x in): the top-``rank`` left singular vectors of the projected G^T, by
    ``torch.svd_lowrank`` as the release (``fixed_rank``), seeded."""
    projected = residual(gradient.float().T, subspace)
    with torch.random.fork_rng(devices=[projected.device] if projected.is_cuda else []):
        torch.manual_seed(seed)
        u, _, _ = torch.svd_lowrank(projected, q=rank)
    return u.T.contiguous()


def grown_subspace(gradient: torch.Tensor, subspace: torch.Tensor,
                   energy: float) -> torch.Tensor:
    """M extended by the projected gradient's top left singular vectors: as many as it takes
    for M's share of the gradient's energy plus theirs to reach ``energy``, at most ``in``
    rows (``extract_gradients.py``, ``energy`` mode)."""
    act = gradient.float().T
    total = (act**2).sum()
    if total == 0:
        return subspace
    u, s, _ = torch.linalg.svd(residual(act, subspace), full_matrices=False)
    kept = (total - (s**2).sum()) / total  # the share M already holds
    need = energy - float(kept)
    if need <= 0:
        return subspace
    added = min(int((torch.cumsum(s**2, 0) / total < need).sum()) + 1, s.numel())
    grown = torch.cat([subspace, u[:, :added].T])
    return grown[: act.shape[0]].contiguous()


# -- the mean gradients of the adapted weights ---------------------------------------------------
@contextmanager
def weight_gradients(
    model: torch.nn.Module, layers: dict[str, torch.nn.Linear]
) -> Iterator[dict[str, torch.Tensor]]:
    """Inside: each backward adds ``dL/dW = sum_tokens dy x^T`` of every layer in ``layers``
    to float32 sums on its device (from its input and output gradient, whatever the weight's
    dtype or the updates beside it). The input embeddings require a gradient so that the
    backward reaches every layer; the model's parameters stay frozen."""
    sums = {n: torch.zeros(m.out_features, m.in_features, device=m.weight.device)
            for n, m in layers.items()}

    def capture(name: str):
        def hook(module, args, output) -> None:
            x = args[0].detach()

            def add(grad: torch.Tensor) -> None:
                sums[name].addmm_(grad.flatten(0, -2).float().T, x.flatten(0, -2).float())

            if output.requires_grad:
                output.register_hook(add)
        return hook

    handles = [m.register_forward_hook(capture(n)) for n, m in layers.items()]
    handles.append(model.get_input_embeddings().register_forward_hook(
        lambda module, args, output: output.requires_grad_(True)))
    try:
        yield sums
    finally:
        for handle in handles:
            handle.remove()


@register_method(
    "keeplora",
    launchers=("single", "ddp"),  # each rank extracts the same subspaces on the same samples
    paper="KeepLoRA: Luo et al., ICLR 2026 (arXiv 2601.19659), residual gradient adaptation",
    trains="a fresh LoRA each stage with A fixed to the stage's gradient directions off the "
           "protected subspace (B trains) + the projector, merged after the stage",
    growth="the protected subspace grows by the stage's dominant gradient directions (at most "
           "in x in per adapted weight; kept float32 on the CPU)",
)
class KeepLoRA(Method):
    """KeepLoRA: LoRA A from the task's gradient off the protected subspace, which then grows."""

    Options = KeepLoRAOptions

    def __init__(self, options: KeepLoRAOptions, context: MethodContext) -> None:
        super().__init__(options, context)
        settings = context.config.lora
        rank = options.rank or settings.rank
        self.lora = dataclasses.replace(settings, rank=rank, alpha=options.alpha or rank / 4)
        self.subspaces: dict[str, torch.Tensor] = {}
        smallest = min((min(m.in_features, m.out_features), n) for n, m in
                       language_model_linears(context.bundle.model, settings.targets).items())
        if rank > smallest[0]:
            raise CLBenchError(f"method.rank={rank}: {smallest[1]} has only {smallest[0]} "
                               "directions to take a LoRA's A from")

    def layers(self, model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
        return language_model_linears(model, self.lora.targets)

    def task_gradients(self, model: torch.nn.Module, stage: Stage) -> dict[str, torch.Tensor]:
        """Each adapted weight's gradient summed over the batches of the stage's evenly spaced
        gradient samples (``extract_gradients.py``: ``linspace`` indices; it takes the mean,
        whose 1/n changes neither a singular vector nor an energy share)."""
        samples = self.training_samples(stage)
        count = int(len(samples) * self.options.gradient_ratio)
        if count < 1:
            raise CLBenchError(f"KeepLoRA: {len(samples)} training samples of {stage.name} leave "
                               f"none for method.gradient_ratio={self.options.gradient_ratio}")
        picked = [samples[i] for i in torch.linspace(0, len(samples) - 1, count).long().tolist()]
        ctx = self.context
        batches = training_batches(picked, ctx.bundle, self.options.gradient_batch_size,
                                   ctx.config.train.max_length, device_of(model))
        total = -(-count // self.options.gradient_batch_size)
        with evaluation_mode(model), torch.enable_grad(), \
                weight_gradients(model, self.layers(model)) as sums:
            for batch in tqdm(batches, total=total, desc=f"KeepLoRA gradients, {stage.name}",
                              disable=not ctx.writes):
                model(**batch).loss.backward()
        return sums

    def before_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        """The pre-trained weights' principal subspaces (first stage), then a LoRA whose frozen
        A holds the stage's gradient directions off them."""
        if not self.subspaces:
            self.subspaces = {n: principal_subspace(effective_weight(m),
                                                    self.options.weight_energy).cpu()
                              for n, m in self.layers(model).items()}
        gradients = self.task_gradients(model, stage)
        model = add_lora(model, self.lora)
        with torch.no_grad():
            for name, gradient in gradients.items():
                subspace = self.subspaces[name].to(gradient.device)
                lora_a = model.get_submodule(PEFT_PREFIX + name).lora_A["default"].weight
                seed = self.context.config.seed + stage.index
                lora_a.copy_(lora_a_init(gradient, subspace, self.lora.rank, seed))
                lora_a.requires_grad_(False)  # release --freeze_lora_A
        return model

    def after_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        """Merge the LoRA, then grow each subspace by the merged model's gradient."""
        plain = merge_lora(model)
        for name, gradient in self.task_gradients(plain, stage).items():
            subspace = self.subspaces[name].to(gradient.device)
            self.subspaces[name] = grown_subspace(gradient, subspace,
                                                  self.options.feature_energy).cpu()
        return plain

    def after_evaluation(self, stage: Stage) -> dict:
        ranks = [s.shape[0] for s in self.subspaces.values()]
        return {"subspace_rank": {"mean": sum(ranks) / len(ranks), "min": min(ranks),
                                  "max": max(ranks)}} if ranks else {}

    # -- checkpoints -------------------------------------------------------------------------
    def save(self, model: torch.nn.Module, folder: Path) -> None:
        super().save(model, folder)
        if self.subspaces:
            save_file({n: s.contiguous() for n, s in self.subspaces.items()},
                      str(folder / SUBSPACE_FILE))

    def load(self, folder: Path) -> torch.nn.Module:
        model = super().load(folder)
        path = folder / SUBSPACE_FILE
        if not path.is_file():
            raise CLBenchError(f"{path} is missing: a KeepLoRA checkpoint keeps its protected "
                               "subspaces there")
        self.subspaces = load_file(str(path))
        missing = sorted(set(self.layers(model)) - set(self.subspaces))
        if missing:
            raise CLBenchError(f"{path}: no subspace for {missing[0]} (another lora.targets?)")
        return model
