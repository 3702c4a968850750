"""SAME's expert layer and its core terms, as the release computes them (LAMDA-CL/Prism
``PEFT/tuners/custom/same.py``, ``SAMELinear`` and ``_same_forward_with_routing``).

E LoRA experts of rank r/E share a router R (E x in). Training: each token's softmax over
``R x``, averaged over the sample's tokens, masked by the adaptive freezing and renormalised,
gives w; inference: the softmax of ``R x / E``, averaged, times the routing prior (the CLIP
anchors' mixture), kept at its top two and renormalised. The output is
``W x + scaling * (sum_j w_j B_j)(sum_i w_i A_i) dropout(x)`` (the release mixes A and B both).
Gradient hooks: the router's gradient is rescaled along the principal directions of the layer's
input covariance (spectral-aware update); every A's gradient is preconditioned by the previous
task's input covariance (curvature-aware scaling).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cl_bench.models.moe_lora import ExpertLoRALinear, SampleInputs, new_router, sequence_mean
from cl_bench.models.updates import linear_float32

EMA = 0.95  # release: utilization and importance, 0.95 old + 0.05 new
START_STEP = 10  # release: layer.start_step, the router hook's first step
REFRESH = 20  # release: the covariance estimate is redone every 20 steps
ROUTER_SCALE = 0.2  # release: router_scaling_factor, the clamp [1 - 0.2, 1 + 0.2]


@dataclass(frozen=True)
class SameSettings:
    """The release's knobs (``config/methods/same.py``)."""

    tau: float = 0.1
    mu: float = 0.9
    window: int = 3
    components: int = 64
    energy: float = 0.9


# -- the core terms ------------------------------------------------------------------------------
def principal_count(s: torch.Tensor, energy: float) -> int:
    """k: the directions whose cumulative share of sum S^2 is <= ``energy``, plus one, at most
    len(S) (release: ``(ratio <= thr).sum() + 1``)."""
    share = torch.cumsum(s**2, 0) / (s**2).sum()
    return max(1, min(int((share <= energy).sum()) + 1, s.numel()))


def windowed_mean(s: torch.Tensor, window: int) -> torch.Tensor:
    """S_smooth[i] = mean of S[max(0, i - window + 1) : i + 1] (release: sliding window)."""
    return torch.stack([s[max(0, i - window + 1): i + 1].mean() for i in range(s.numel())])


def spectral_router_gradient(grad: torch.Tensor, u: torch.Tensor, s: torch.Tensor,
                             energy: float, window: int) -> torch.Tensor:
    """SAME's spectral-aware router update: the gradient's part along the k principal input
    directions V is rescaled per direction by 1/S_smooth, normalised by its largest and clamped
    to [0.8, 1.2]; the orthogonal part is kept (release ``_spectral_aware_router_hook``)."""
    v = u[:, : principal_count(s, energy)]
    scale = 1.0 / (windowed_mean(s[: v.shape[1]], window) + 1e-6)
    scale = (scale / scale.max()).clamp(1.0 - ROUTER_SCALE, 1.0 + ROUTER_SCALE)
    along = grad @ v
    return (along * scale) @ v.T + (grad - along @ v.T)


def curvature_gradient(grad: torch.Tensor, u: torch.Tensor, s: torch.Tensor, energy: float,
                       mu: float) -> torch.Tensor:
    """SAME's curvature-aware expert update of an A gradient (r x in), with the previous task's
    input covariance (U, S): ``g U_k diag(1 / (S_k + mu)) U_k^T + (g - g U_k U_k^T) / mu``
    (release ``_make_curvature_hook``)."""
    uk = u[:, : principal_count(s, energy)]
    along = grad @ uk
    return (along / (s[: uk.shape[1]] + mu)) @ uk.T + (grad - along @ uk.T) / mu


def covariance_estimate(x: torch.Tensor, components: int,
                        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, S) of the tokens' input covariance by one randomised range finder: U = QR of
    ``Xc^T Xc Q`` with Gaussian Q (in x k), S = the standard deviation along each column of U
    (release ``_update_router_covariance``); ``generator`` draws Q on the CPU."""
    xc = x - x.mean(0, keepdim=True)
    k = min(components, x.shape[1])
    q = torch.randn(x.shape[1], k, generator=generator).to(x.device)
    u, _ = torch.linalg.qr(xc.T @ (xc @ q), mode="reduced")
    s = torch.sqrt(((xc @ u) ** 2).sum(0) / (x.shape[0] - 1 + 1e-8))
    return u, s


def minmax(t: torch.Tensor) -> torch.Tensor:
    """(t - min) / (max - min), zeros when t is constant (release ``normalize``)."""
    if t.max() == t.min():
        return torch.zeros_like(t)
    return (t - t.min()) / (t.max() - t.min() + 1e-8)


def freezing_masks(utilization: torch.Tensor, importance: torch.Tensor, tau: float,
                   own: int) -> torch.Tensor:
    """SAME's adaptive expert activation: experts with ``minmax(utilization) -
    minmax(importance) < tau`` are frozen (0), never the task's own expert (release
    ``_apply_adaptive_freezing``)."""
    frozen = minmax(utilization) - minmax(importance) < tau
    frozen[own] = False
    return (~frozen).float()


def masked_routing(weights: torch.Tensor, masks: torch.Tensor, own: int) -> torch.Tensor:
    """Training routes (B x E) with the frozen experts' weights removed and renormalised; a row
    left empty goes to the task's own expert (release ``_get_masked_routing``)."""
    masked = weights * masks
    empty = masked.sum(-1) == 0
    if empty.any():
        masked[empty, own] = 1.0
    return masked / masked.sum(-1, keepdim=True)


def top_two(weights: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Inference routes (B x E): weights times the prior, renormalised, kept at the two largest
    and renormalised (release ``_apply_topk_sparsification``, k = 2)."""
    p = weights * prior
    p = p / (p.sum(-1, keepdim=True) + 1e-8)
    if p.shape[-1] <= 2:
        return p
    top = p.topk(2, dim=-1)
    kept = torch.zeros_like(p).scatter_(-1, top.indices, top.values)
    return kept / (kept.sum(-1, keepdim=True) + 1e-8)


def in_recomputation() -> bool:
    """Whether this forward is activation checkpointing's recomputation inside a backward (the
    release skips its statistics there as well)."""
    return torch._C._current_graph_task_id() != -1


# -- the layer -----------------------------------------------------------------------------------
class SAMELinear(ExpertLoRALinear):
    """SAME's MoE-LoRA layer; ``inputs.features``: each sample's routing prior (B x E) at
    inference."""

    def __init__(self, base: torch.nn.Linear, experts: int, rank: int, scaling: float,
                 dropout: float, inputs: SampleInputs, settings: SameSettings,
                 seed: int) -> None:
        super().__init__(base, experts, rank, scaling, dropout)
        self.inputs, self.settings, self.seed = inputs, settings, seed
        device = base.weight.device
        self.router = new_router(experts, base.in_features, device)  # release lora_router
        k = min(settings.components, base.in_features)
        for name, shape, kept in (("cov_U", (base.in_features, k), False),
                                  ("cov_S", (k,), False), ("prev_U", (base.in_features, k), True),
                                  ("prev_S", (k,), True)):  # kept: the release's carried buffers
            self.register_buffer(name, torch.zeros(shape, device=device), persistent=kept)
        self.register_buffer("prev_valid", torch.zeros((), dtype=torch.bool, device=device))
        self.register_buffer("importance", torch.full((experts,), 1.0 / experts, device=device))
        self.register_buffer("utilization", torch.full((experts,), 1.0 / experts,
                                                       device=device), persistent=False)
        self.register_buffer("masks", torch.ones(experts, device=device), persistent=False)
        self.task = 0  # the stage being trained, 0-based
        self.step = 0
        self.all_frozen = False
        self.router.register_hook(self._router_hook)
        self.A.register_hook(self._expert_hook)

    def start_task(self, task: int) -> None:
        """A new task: the release starts a process per task, which keeps only the previous
        task's covariance snapshot and the importance (its carried buffers)."""
        self.task, self.step, self.all_frozen = task, 0, False
        self.utilization.fill_(1.0 / self.experts)
        self.masks.fill_(1.0)
        self.cov_U.zero_()
        self.cov_S.zero_()

    @torch.no_grad()
    def end_task(self) -> None:
        """Keep the task's last covariance estimate for the next task's curvature hook
        (release ``save_task_covariance_snapshot``)."""
        self.prev_U.copy_(self.cov_U)
        self.prev_S.copy_(self.cov_S)
        self.prev_valid.fill_(bool((self.cov_S > 1e-10).any()))

    @property
    def own_expert(self) -> int:
        return min(self.task, self.experts - 1)

    def _router_hook(self, grad: torch.Tensor) -> torch.Tensor:
        if not self.training or self.step < START_STEP or self.cov_S.sum() == 0:
            return grad
        return spectral_router_gradient(grad.float(), self.cov_U, self.cov_S,
                                        self.settings.energy, self.settings.window).to(grad)

    def _expert_hook(self, grad: torch.Tensor) -> torch.Tensor:
        if not self.training or self.task == 0 or not bool(self.prev_valid):
            return grad
        return curvature_gradient(grad.float(), self.prev_U, self.prev_S, self.settings.energy,
                                  self.settings.mu).to(grad)

    def routes(self, x: torch.Tensor) -> torch.Tensor:
        """Each sample's weights over the experts (B x E)."""
        mask = self.inputs.mask_for(x)
        logits = x.float() @ self.router.T
        if self.training:  # release: the masks of the steps before, then this step's statistics
            probs = torch.softmax(logits, dim=-1)
            routes = masked_routing(sequence_mean(probs, mask), self.masks.clone(),
                                    self.own_expert)
            if not in_recomputation():
                self._observe(x.float(), probs.detach(), mask)
            return routes
        probs = torch.softmax(logits / self.experts, dim=-1)  # release: logits / expert_num
        prior = self.inputs.features_for(x.shape[0]).to(x.device, torch.float32)
        return top_two(sequence_mean(probs, mask), prior)

    @torch.no_grad()
    def _observe(self, x: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor | None) -> None:
        """The training statistics of one forward: the covariance estimate (first step, then
        every REFRESH), the utilization and importance EMAs and the freezing masks."""
        keep = (mask.bool() if mask is not None and mask.shape == x.shape[:2]
                else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device))
        tokens, p = x[keep.to(x.device)], probs[keep.to(x.device)]
        if self.step % REFRESH == 0 or self.cov_S.sum() == 0:
            generator = torch.Generator().manual_seed(self.seed * 100003 + self.step)
            u, s = covariance_estimate(tokens, self.settings.components, generator)
            self.cov_U.copy_(u)
            self.cov_S.copy_(s)
        self.step += 1
        self.utilization.mul_(EMA).add_((1 - EMA) * p.mean(0))
        energy = tokens.pow(2).sum(-1, keepdim=True)
        self.importance.mul_(EMA).add_((1 - EMA) * (p * energy).mean(0))
        if not self.all_frozen:
            self.masks.copy_(freezing_masks(self.utilization, self.importance,
                                            self.settings.tau, self.own_expert))
            others = torch.ones(self.experts, dtype=torch.bool)
            others[self.own_expert] = False
            self.all_frozen = bool((self.masks[others.to(self.masks.device)] == 0).all())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear_float32(self.base, x)
        w = self.routes(x)
        shape = (x.shape[0], *([1] * (x.ndim - 2)), self.experts, 1)
        a = (self.expert_inputs(x) * w.view(shape)).sum(-2)  # release: sum_i w_i A_i x
        b = self.B.view(self.B.shape[0], self.experts, -1)  # expert j: B_j (out x r/E)
        mixed_b = torch.einsum("oer,be->bor", b, w)  # release: sum_j w_j B_j, per sample
        mixed = (a.flatten(1, -2) @ mixed_b.transpose(1, 2)).view(*x.shape[:-1], -1)
        return (out + self.scaling * mixed).to(self.base.weight.dtype)
