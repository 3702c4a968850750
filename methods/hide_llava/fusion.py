"""HiDe-LLaVA fusion (eq. 6-7): the remaining layers carry one LoRA fused from every task's."""

from __future__ import annotations

import torch

from cl_bench.errors import CLBenchError
from cl_bench.models.deltas import LoraFactors
from cl_bench.models.updates import linear_float32

FUSIONS = ("sum", "reference")


# -- fusion: HiDe-LLaVA eq. 6 -------------------------------------------------------------------
def fused_factors(
    experts: list[LoraFactors], fusion: str = "sum", weight: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B_f, A_f) of the fused LoRA, scaling included: delta = B_f @ A_f.

    ``sum``: sum_i eps_i s_i B_i A_i (HiDe-LLaVA eq. 6), exactly, as a rank-(sum r_i) product.
    ``reference``: (sum_i eps_i s_i B_i)(sum_i eps_i A_i), cross terms included (reference code).
    """
    if fusion == "sum":
        B = torch.cat([weight * f.scaling * f.B.float() for f in experts], dim=1)
        A = torch.cat([f.A.float() for f in experts], dim=0)
        return B, A  # HiDe-LLaVA eq. 6: B @ A = sum_i eps_i * s_i * B_i @ A_i
    if fusion == "reference":
        ranks = {f.A.shape[0] for f in experts}
        if len(ranks) != 1:
            raise CLBenchError(f"fusion=reference needs LoRAs of one rank, not {sorted(ranks)}")
        B = sum(weight * f.scaling * f.B.float() for f in experts)
        A = sum(weight * f.A.float() for f in experts)
        return B, A
    raise CLBenchError(f"fusion {fusion!r}: expected one of {FUSIONS}")



class FusedLoRALinear(torch.nn.Module):
    """base(x) + B_f A_f x: the fused LoRA branch of the remaining layers (HiDe-LLaVA eq. 7).
    The factors stay float32 on the base's device; base and branch are summed in float32."""

    def __init__(self, base: torch.nn.Linear, B: torch.Tensor, A: torch.Tensor, rank: int) -> None:
        super().__init__()
        self.base, self.rank = base, rank
        device = base.weight.device
        self.A = torch.nn.Parameter(A.to(device, torch.float32), requires_grad=False)
        self.B = torch.nn.Parameter(B.to(device, torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear_float32(self.base, x)  # rounded once, with the branch
        out = out + (x.float() @ self.A.T) @ self.B.T  # HiDe-LLaVA eq. 7: O_rem = E-bar_T(h)
        return out.to(self.base.weight.dtype)

    def lora_parameters(self) -> int:
        """One LoRA of the experts' rank (Table 3's count; fusion=sum may merge it into W)."""
        return self.rank * (self.base.in_features + self.base.out_features)
