"""Singular values of a stage's LoRA updates before and after consolidation (LLaVA-c Figure 5).

Each LoRA update scaling * B @ A is decomposed in factored form (``lora_spectrum``: QR of the
factors and a q x q SVD, never the M x N product), so this costs about as much as the
consolidation itself. Written to ``spectra/stage_<t>.json`` in the run folder:
``{"stage", "consolidation", "alpha", "boundary", "matrices": {module: {"shape": [M, N],
"before": [s_1..s_p], "after": [s~_1..s~_p]}}}`` with p = min(LoRA rank, M, N).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import Tensor

from cl_bench.errors import CLBenchError
from cl_bench.models.deltas import StageDelta
from methods.llava_c.consolidation import LoraSpectrum, lora_spectrum, sac_singular_values


def consolidated_singular_values(
    spectrum: LoraSpectrum, consolidation: str, alpha: float, boundary: str
) -> Tensor:
    """The singular values of the consolidated update (same singular vectors as the raw one)."""
    if consolidation == "sac":
        return sac_singular_values(spectrum, alpha, boundary)  # LLaVA-c eq. 5-7
    if consolidation == "modelmix":
        return alpha * spectrum.s  # LLaVA-c eq. 4: uniform scaling
    if consolidation == "none":
        return spectrum.s
    raise CLBenchError(f"consolidation {consolidation!r}: expected sac, modelmix or none")


def stage_spectra(delta: StageDelta, consolidation: str, alpha: float, boundary: str) -> dict:
    """Before and after singular values of every LoRA update of a stage, by module name."""
    matrices = {}
    for name, factors in delta.lora.items():
        spectrum = lora_spectrum(factors.B, factors.A, factors.scaling)
        after = consolidated_singular_values(spectrum, consolidation, alpha, boundary)
        matrices[name] = {
            "shape": [factors.B.shape[0], factors.A.shape[1]],
            "before": [float(v) for v in spectrum.s.cpu()],
            "after": [float(v) for v in after.cpu()],
        }
    return matrices


def write_spectra(run_dir: Path, stage: int, delta: StageDelta, consolidation: str,
                  alpha: float, boundary: str) -> Path:
    """``spectra/stage_<stage>.json`` (rank 0 writes it)."""
    path = Path(run_dir) / "spectra" / f"stage_{stage}.json"
    data = {"stage": stage, "consolidation": consolidation, "alpha": alpha,
            "boundary": boundary,
            "matrices": stage_spectra(delta, consolidation, alpha, boundary)}
    if int(os.environ.get("RANK", "0")) == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
    return path
