"""HiDe-LLaVA routing (eq. 4): per-sample weights over the tasks from anchor similarities
(eq. 3, ``cl_bench.models.routed_lora.anchor_similarity``); the top layer mixes the tasks' LoRA
branches by them (eq. 5, ``RoutedLoRALinear``)."""

from __future__ import annotations

import torch


# -- routing: HiDe-LLaVA eq. 4 ------------------------------------------------------------------
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
