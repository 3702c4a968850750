"""Weight-update consolidation: ModelMix and LLaVA-c's spectral-aware consolidation (SAC).

Pure tensor functions, no model code. Equations follow LLaVA-c section 4.1 (eq. 4-7) and
Algorithm 1 (lines 7-12). For a singular-value vector s (descending, length r = min(M, N)):

- k = argmin_{k in 1..r} ((1/k) sum_{j=1}^{min(k+1, r)} s_j - alpha s_1)^2, ties to the smallest k;
- s~_i = (1/k) sum_{j=i}^{i+k} s'_j, with s'_j = s_r beyond r (``boundary="pad"``, footnote 2) or
  the window cut at r (``boundary="truncate"``, Algorithm 1 line 10).

A LoRA update scaling * B @ A is consolidated in factored form (``lora_spectrum`` once, then
``apply_sac`` per alpha), never forming the M x N product.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from cl_bench.errors import CLBenchError

BOUNDARIES = ("pad", "truncate")
# Matrices with at most this many elements are decomposed in float64 (cheap, and exact tests).
_TINY_NUMEL = 1 << 16


def check_alpha(alpha: float) -> float:
    """Return ``alpha`` as a float; raise CLBenchError unless it is a number in [0, 1]."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise CLBenchError(f"consolidation alpha must be a number in [0, 1], got {alpha!r}")
    if not 0.0 <= float(alpha) <= 1.0:  # also rejects NaN
        raise CLBenchError(f"consolidation alpha must be in [0, 1], got {alpha!r}")
    return float(alpha)


def check_boundary(boundary: str) -> str:
    """Return ``boundary``; raise CLBenchError unless it is one of BOUNDARIES."""
    if boundary not in BOUNDARIES:
        valid = ", ".join(repr(b) for b in BOUNDARIES)
        raise CLBenchError(f"unknown SAC boundary {boundary!r}; valid: {valid}")
    return boundary


def _check_spectrum(s: Tensor) -> None:
    if s.ndim != 1 or s.numel() == 0:
        raise CLBenchError(f"singular values must be a non-empty 1-D tensor, got {tuple(s.shape)}")
    if s.numel() > 1 and bool((s[1:] > s[:-1]).any()):
        raise CLBenchError("singular values must be sorted in descending order")


def _work_dtype(numel: int, dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs and tiny matrices, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 or numel <= _TINY_NUMEL else torch.float32


def modelmix_delta(delta: Tensor, alpha: float) -> Tensor:
    """ModelMix: the update scaled uniformly, alpha * delta."""
    alpha = check_alpha(alpha)
    return alpha * delta  # LLaVA-c eq. 4


def sac_window(s: Tensor, alpha: float) -> int:
    """Window size k of SAC for descending singular values ``s`` (smallest k on ties)."""
    alpha = check_alpha(alpha)
    _check_spectrum(s)
    s64 = s.detach().to(torch.float64)
    r = s64.numel()
    ks = torch.arange(1, r + 1, dtype=torch.int64, device=s64.device)
    upper = torch.clamp(ks, max=r - 1)  # 0-based index of s_{min(k+1, r)}
    means = s64.cumsum(0)[upper] / ks  # Algorithm 1 line 9: (1/k) sum_{j=1}^{min(k+1,r)} s_j
    err = (means - alpha * s64[0]) ** 2  # LLaVA-c eq. 7: squared distance to alpha * s_1
    return int(torch.argmin(err)) + 1  # torch.argmin returns the first minimum: smallest k


def sac_scale(s: Tensor, alpha: float, boundary: str = "pad") -> Tensor:
    """Rescaled singular values s~ of SAC, same length and dtype as ``s``."""
    alpha, boundary = check_alpha(alpha), check_boundary(boundary)
    k = sac_window(s, alpha)
    s64 = s.detach().to(torch.float64)
    r = s64.numel()
    # footnote 2 pads with s_r; cutting the window at r (Algorithm 1 line 10) equals padding with 0
    fill = s64[-1] if boundary == "pad" else s64.new_zeros(())
    padded = torch.cat([s64, fill.expand(k)])
    csum = torch.cat([s64.new_zeros(1), padded.cumsum(0)])
    idx = torch.arange(r, device=s64.device)
    scaled = (csum[idx + k + 1] - csum[idx]) / k  # LLaVA-c eq. 6: (1/k) sum_{j=i}^{i+k} s'_j
    return scaled.to(s.dtype)


def sac_delta(delta: Tensor, alpha: float, boundary: str = "pad") -> Tensor:
    """SAC of a full update through its SVD; tensors with fewer than 2 dims get ModelMix."""
    alpha, boundary = check_alpha(alpha), check_boundary(boundary)
    if delta.ndim < 2:
        return modelmix_delta(delta, alpha)  # biases, norms: uniform alpha * delta (spec)
    if delta.numel() == 0:
        return delta.clone()
    matrix = delta.detach().reshape(delta.shape[0], -1)  # LLaVA-c footnote 1: reshape to M x N
    matrix = matrix.to(_work_dtype(matrix.numel(), delta.dtype))
    if matrix.shape[0] < matrix.shape[1]:  # LAPACK is ~3x faster on the tall transpose
        v, s, uh = torch.linalg.svd(matrix.T, full_matrices=False)  # Algorithm 1 line 7
        u, vh = uh.T, v.T
    else:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)  # Algorithm 1 line 7
    s_new = sac_scale(s, alpha, boundary)
    rebuilt = (u * s_new) @ vh  # Algorithm 1 line 12: U diag(s~) V^T
    return rebuilt.reshape(delta.shape).to(delta.dtype)


class LoraSpectrum(NamedTuple):
    """Exact thin SVD of scaling * B @ A: left @ diag(s) @ right, p = min(q, M, N) terms."""

    left: Tensor  # M x p, orthonormal columns
    s: Tensor  # p, descending, float64
    right: Tensor  # p x N, orthonormal rows
    dtype: torch.dtype  # dtype of the LoRA factors, the default dtype of apply_sac's output

    @property
    def rank(self) -> int:
        """r = min(M, N), the length of the full SVD of the M x N product."""
        return min(self.left.shape[0], self.right.shape[1])


def lora_spectrum(B: Tensor, A: Tensor, scaling: float) -> LoraSpectrum:
    """Decompose scaling * B @ A (B: M x q, A: q x N) by QR of B and A^T and a q x q core SVD."""
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise CLBenchError(
            f"LoRA factors must be B: M x q and A: q x N, got {tuple(B.shape)} and {tuple(A.shape)}"
        )
    if not math.isfinite(scaling):
        raise CLBenchError(f"LoRA scaling must be finite, got {scaling!r}")
    work = _work_dtype(max(B.numel(), A.numel()), B.dtype)
    qb, rb = torch.linalg.qr(B.detach().to(work), mode="reduced")  # B = Qb Rb
    qa, ra = torch.linalg.qr(A.detach().to(work).T, mode="reduced")  # A^T = Qa Ra
    core = scaling * (rb.to(torch.float64) @ ra.to(torch.float64).T)  # delta = Qb core Qa^T
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    left = qb @ u.to(work)
    right = vh.to(work) @ qa.T
    return LoraSpectrum(left, s, right, B.dtype)


def sac_singular_values(spectrum: LoraSpectrum, alpha: float, boundary: str = "pad") -> Tensor:
    """The p rescaled singular values s~_1..s~_p of SAC on a decomposed LoRA update."""
    alpha, boundary = check_alpha(alpha), check_boundary(boundary)
    p, r = spectrum.s.numel(), spectrum.rank
    full = torch.cat([spectrum.s, spectrum.s.new_zeros(r - p)])  # s_{p+1..r} = 0, r = min(M, N)
    return sac_scale(full, alpha, boundary)[:p]  # LLaVA-c eq. 6 on the zero-padded spectrum


def apply_sac(
    spectrum: LoraSpectrum, alpha: float, boundary: str = "pad", dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """Factors (P: M x p, Q: p x N) with P @ Q = SAC of the decomposed update.

    Cheap per alpha (a length-r rescaling and an M x p column scaling), so an alpha sweep costs one
    ``lora_spectrum`` per matrix. Output dtype: ``dtype``, else the LoRA factors' dtype.
    """
    scaled = sac_singular_values(spectrum, alpha, boundary)
    # Exactness: k and the windows of i <= p run on the zero-padded length-r spectrum, so windows
    # reaching past p read the true zeros. For i > p every s'_j in the window is 0 (a true zero, or
    # the pad value s_r, which is 0 whenever p < r), so s~_i = 0 and dropping those directions is
    # exact; when p == r (q >= min(M, N)) nothing is padded and all r values are kept.
    out = dtype or spectrum.dtype
    factor_p = spectrum.left * scaled.to(spectrum.left.dtype)  # Algorithm 1 line 12: U diag(s~)
    return factor_p.to(out), spectrum.right.to(out)


def sac_lora_factors(
    B: Tensor, A: Tensor, scaling: float, alpha: float, boundary: str = "pad"
) -> tuple[Tensor, Tensor]:
    """SAC of scaling * B @ A as factors (P, Q) in B's dtype, without forming the product."""
    alpha, boundary = check_alpha(alpha), check_boundary(boundary)
    return apply_sac(lora_spectrum(B, A, scaling), alpha, boundary)
