"""Linear CKA between layer outputs (HiDe-LLaVA appendix B; Kornblith et al., 2019).

HiDe-LLaVA chose to expand only the top layer because the outputs of models trained on
different tasks stay similar (high CKA) in every layer but the top one. ``linear_cka`` is the
pure function; ``layer_features`` collects one feature vector per sample and decoder layer.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from cl_bench.errors import CLBenchError
from cl_bench.models.backbones import backbone_of
from cl_bench.models.batching import collate_batch, prompt_item
from cl_bench.models.llava import ModelBundle
from cl_bench.models.placement import to_model
from tasks.loaders import Sample, load_samples, load_test_samples

FEATURE_POINTS = ("mlp", "block")


def centered(x: torch.Tensor) -> torch.Tensor:
    """Features minus their mean over samples (the X-hat of appendix B, step 1)."""
    return x - x.mean(dim=0, keepdim=True)


def hsic(k_x: torch.Tensor, k_y: torch.Tensor) -> torch.Tensor:
    """HSIC of two linear kernel matrices: tr(K_X K_Y) / (n-1)^2 (HiDe-LLaVA app. B, step 2)."""
    n = k_x.shape[0]
    return torch.trace(k_x @ k_y) / (n - 1) ** 2


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two n x p representations of the same n samples (HiDe-LLaVA app. B).

    CKA = HSIC(K_X, K_Y) / sqrt(HSIC(K_X, K_X) HSIC(K_Y, K_Y)) with K = X-hat X-hat^T; computed
    through the identity tr(X X^T Y Y^T) = ||X^T Y||_F^2, so the n x n kernels are never formed.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise CLBenchError(
            f"CKA needs two n x p matrices over the same samples, got {tuple(x.shape)} "
            f"and {tuple(y.shape)}"
        )
    if x.shape[0] < 2:
        raise CLBenchError("CKA needs at least two samples")
    xc, yc = centered(x.double()), centered(y.double())
    cross = (xc.T @ yc).pow(2).sum()  # tr(K_X K_Y), step 2 (the 1/(n-1)^2 cancels in step 3)
    norm_x = (xc.T @ xc).pow(2).sum().sqrt()
    norm_y = (yc.T @ yc).pow(2).sum().sqrt()
    if norm_x == 0 or norm_y == 0:
        raise CLBenchError("CKA is undefined for a constant representation")
    return float(cross / (norm_x * norm_y))  # HiDe-LLaVA app. B, step 3


def _probe_point(layer: torch.nn.Module, point: str) -> torch.nn.Module:
    if point not in FEATURE_POINTS:
        raise CLBenchError(f"feature point {point!r}: expected one of {FEATURE_POINTS}")
    if point == "block":
        return layer
    mlp = getattr(layer, "mlp", None)
    down = getattr(mlp, "down_proj", None)
    if down is None:
        raise CLBenchError("decoder layer has no mlp.down_proj: use --features block")
    return down


@contextmanager
def _recording(modules: list[torch.nn.Module], store: list[list[torch.Tensor]],
               mask: list[torch.Tensor]) -> Iterator[None]:
    """Forward hooks that keep each module's output, mean-pooled over non-padding tokens."""

    def hook_for(index: int):
        def hook(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            m = mask[0].to(hidden.device, hidden.dtype).unsqueeze(-1)
            store[index].append(((hidden * m).sum(1) / m.sum(1)).float().cpu())

        return hook

    handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(modules)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def layer_features(
    model: torch.nn.Module,
    bundle: ModelBundle,
    samples: list[Sample],
    point: str = "mlp",
    batch_size: int = 16,
) -> list[torch.Tensor]:
    """Per decoder layer, an n x hidden matrix: each sample's prompt, mean-pooled over tokens.

    ``point="mlp"`` records the MLP output (``down_proj``, as the HiDe-LLaVA reference code
    does); ``"block"`` the decoder layer's output (the residual stream).
    """
    modules = [_probe_point(layer, point) for layer in backbone_of(model).decoder_layers(model)]
    store: list[list[torch.Tensor]] = [[] for _ in modules]
    mask: list[torch.Tensor] = []
    model.eval()
    with _recording(modules, store, mask):
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            items = [prompt_item(bundle, s.question, s.image) for s in chunk]
            batch = to_model(collate_batch(items, bundle), model)
            mask[:] = [batch["attention_mask"]]
            model(**batch)
    return [torch.cat(parts) for parts in store]


def cka_by_layer(features_a: list[torch.Tensor], features_b: list[torch.Tensor]) -> list[float]:
    """Linear CKA of two models' (or inputs') features, layer by layer."""
    if len(features_a) != len(features_b):
        raise CLBenchError(
            f"the two models have {len(features_a)} and {len(features_b)} layers: CKA compares "
            "the same layer of two models of one architecture"
        )
    n = min(a.shape[0] for a in features_a + features_b)
    return [linear_cka(a[:n], b[:n]) for a, b in zip(features_a, features_b, strict=True)]


# -- the analysis behind ``clbench analyze cka`` ----------------------------------------------
@dataclass
class CkaSubject:
    """One model on one task's inputs: per-layer features, computed once."""

    model: str
    task: str
    features: list[torch.Tensor]


def subject_features(
    label: str, model: torch.nn.Module, bundle: ModelBundle, task: str, samples: list[Sample],
    point: str, batch_size: int,
) -> CkaSubject:
    return CkaSubject(label, task, layer_features(model, bundle, samples, point, batch_size))


def pairwise(subjects: list[CkaSubject]) -> list[tuple[CkaSubject, CkaSubject, int, float]]:
    """CKA of every pair of subjects (i < j) at every layer (1 = bottom)."""
    rows = []
    for i, a in enumerate(subjects):
        for b in subjects[i + 1 :]:
            for layer, value in enumerate(cka_by_layer(a.features, b.features), start=1):
                rows.append((a, b, layer, value))
    return rows


def task_samples(suite, task: str, data_root: Path, split: str, limit: int | None,
                 seed: int = 0) -> list[Sample]:
    """A fixed random subset (per seed) of a task's train or test samples."""
    files = suite.task_files(suite.task(task), data_root)
    samples = load_test_samples(files) if split == "test" else load_samples(files.train,
                                                                             files.image_root)
    if limit is not None and len(samples) > limit:
        samples = random.Random(seed).sample(samples, limit)
    return samples
