"""HiDe-LLaVA's options: paper values by default, the ablations as other values."""

from __future__ import annotations

from dataclasses import dataclass

from cl_bench.errors import CLBenchError
from cl_bench.models.encoders import TEXT_FEATURES
from methods.hide_llava.fusion import FUSIONS

# layout -> (mode of the top layer(s), mode of every other layer); modes: expand | merge | none
LAYOUTS = {
    "hide": ("expand", "merge"),  # HiDe-LLaVA
    "merge_all": ("merge", "merge"),  # Table 3 "Merge (1-32)": fuse every layer
    "merge_rest": ("none", "merge"),  # Table 3 "Merge (1-31)": fuse 1-31, no LoRA on the top
    "expand_all": ("expand", "expand"),  # Table 3 "Expand (1-32)": route every layer
    "expand_rest": ("none", "expand"),  # Table 3 "Expand (1-31)": route 1-31, no LoRA on the top
}


@dataclass
class HiDeOptions:
    """HiDe-LLaVA options (paper values by default; rank None = the config's ``lora.rank``).

    layout: hide | merge_all | merge_rest | expand_all | expand_rest (Table 3).
    fusion: sum (eq. 6: sum of the tasks' B_i A_i) | reference ((sum B_i)(sum A_i), the
    reference code). encoder: a local CLIP folder, ``llava``, or None for the suite's default.
    """

    rank: int | None = None
    """Rank of each task's LoRA (None: the config's lora.rank; paper: 8)."""
    temperature: float = 0.1
    """T of the routing softmax (eq. 4; Appendix C, Figure 7)."""
    image_weight: float = 0.5
    """alpha of eq. 4, the weight of the image similarity (Figure 4: 1 or 0)."""
    text_weight: float = 0.5
    """beta of eq. 4, the weight of the instruction similarity (Figure 4: 0 or 1)."""
    fusion: str = "sum"
    """sum (eq. 6: sum of the tasks' B_i A_i) or reference ((sum B_i)(sum A_i), the reference
    code)."""
    fusion_weight: float = 1.0
    """eps_i of eq. 6 (Figure 5)."""
    layout: str = "hide"
    """Which layers are routed, fused or left without LoRA: hide, merge_all, merge_rest,
    expand_all, expand_rest (Table 3)."""
    top_layers: int = 1
    """How many of the highest decoder layers count as the top."""
    encoder: str | None = None
    """The anchors' feature encoder: a local CLIP folder, llava, or None for the suite's
    default."""
    text_feature: str = "pooled"
    """CLIP text feature: the text tower's pooled output (reference code) or projected."""
    anchor_samples: int | None = None
    """Training samples per task the anchors average over (None: all of them)."""
    encoder_batch: int = 64
    """Batch size of the anchor computation."""


def check_options(o: HiDeOptions) -> None:
    problems = []
    if o.layout not in LAYOUTS:
        problems.append(f"method.layout={o.layout!r}: expected one of {', '.join(LAYOUTS)}")
    if o.fusion not in FUSIONS:
        problems.append(f"method.fusion={o.fusion!r}: expected one of {', '.join(FUSIONS)}")
    if o.text_feature not in TEXT_FEATURES:
        problems.append(f"method.text_feature={o.text_feature!r}: expected one of {TEXT_FEATURES}")
    if o.temperature <= 0:
        problems.append(f"method.temperature={o.temperature}: must be > 0")
    if o.image_weight < 0 or o.text_weight < 0 or o.image_weight + o.text_weight == 0:
        problems.append("method.image_weight and method.text_weight: >= 0, not both 0")
    if o.top_layers < 1:
        problems.append(f"method.top_layers={o.top_layers}: must be >= 1")
    if o.rank is not None and o.rank < 1:
        problems.append(f"method.rank={o.rank}: must be >= 1")
    if problems:
        raise CLBenchError("; ".join(problems))
