"""Model Tailor's patch of one weight: the fine-tuned entries that matter most are kept (the
"model patch"), the others go back to the weight before fine-tuning, and the kept ones are
adjusted for the reverted ones (the "patch decorator").

Checked against the reference llava/train/sparsegpt.py ``SparseGPT.fasterprune`` (facts only):
per block of 128 input columns, importance = 0.8 * z(salience) + 0.2 * z(sensitivity), each
standardised per row over the block, with salience |W_ft - W_pre| and sensitivity
W^2 / [U]_jj^2 (U the upper Cholesky factor of the damped inverse Hessian, the OBS saliency);
entries with importance <= the sparsity quantile are reverted, column by column, each column's
error spread onto the later columns through U.
"""

from __future__ import annotations

import torch

from cl_bench.errors import CLBenchError

# the sign of the error spread: the reference adds (W += err U), OBS/SparseGPT subtract
COMPENSATIONS = {"reference": 1.0, "obs": -1.0, "none": 0.0}


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """U, the upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; dead inputs (zero
    diagonal) get H_jj = 1 (sparsegpt.py)."""
    H = hessian.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H += damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], device=H.device)
    try:
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(H))
        return torch.linalg.cholesky(inverse, upper=True)
    except torch.linalg.LinAlgError as err:
        raise CLBenchError(f"Model Tailor: the input Hessian is not positive definite ({err}); "
                           "raise method.damp") from None


def standardised(x: torch.Tensor) -> torch.Tensor:
    """Per row: (x - mean) / std over the columns (std unbiased, as torch.std); undefined (NaN)
    for a single column, as in the reference, where such entries are then all kept."""
    if x.shape[1] < 2:
        return torch.full_like(x, float("nan"))
    return (x - x.mean(dim=1, keepdim=True)) / x.std(dim=1, keepdim=True)


def importance(
    salience: torch.Tensor, sensitivity: torch.Tensor, salience_weight: float
) -> torch.Tensor:
    """Fused importance of a block's entries (sparsegpt.py: 0.8 salience + 0.2 sensitivity)."""
    return (salience_weight * standardised(salience)
            + (1 - salience_weight) * standardised(sensitivity))


def reverted_entries(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Entries at or below the value at position int(numel * sparsity) of the sorted scores:
    they go back to the weight before fine-tuning (sparsegpt.py, ``<=`` the threshold)."""
    threshold = torch.sort(scores.flatten()).values[int(scores.numel() * sparsity)]
    return scores <= threshold


@torch.no_grad()
def tailor_weight(
    tuned: torch.Tensor,
    before: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    salience_weight: float = 0.8,
    blocksize: int = 128,
    damp: float = 0.01,
    compensation: str = "reference",
) -> torch.Tensor:
    """The tailored weight (fp32, on ``tuned``'s device) from the fine-tuned weight, the weight
    before fine-tuning and the Hessian of the layer's inputs (in x in)."""
    if compensation not in COMPENSATIONS:
        raise CLBenchError(f"compensation {compensation!r}: expected one of {list(COMPENSATIONS)}")
    sign = COMPENSATIONS[compensation]
    W = tuned.float().clone()
    W_pre = before.to(W)
    U = inverse_hessian_factor(hessian.to(W.device), damp)
    salience = (W - W_pre).abs()  # Model Tailor salience: |W_ft - W_pre|
    columns = W.shape[1]
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        sensitivity = W1**2 / torch.diag(U1).reshape(1, -1) ** 2  # OBS saliency w^2 / [H^-1]_jj
        revert = reverted_entries(importance(salience[:, i1:i2], sensitivity, salience_weight),
                                  sparsity)
        errors = torch.zeros_like(W1)
        for i in range(i2 - i1):
            w = W1[:, i].clone()
            q = torch.where(revert[:, i], W_pre[:, i1 + i], w)
            errors[:, i] = (w - q) / U1[i, i]
            W1[:, i:] += sign * errors[:, i : i + 1] @ U1[i : i + 1, i:]  # patch decorator
            W1[:, i] = q
        W[:, i1:i2] = W1
        W[:, i2:] += sign * errors @ U[i1:i2, i2:]
    return W
