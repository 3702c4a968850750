"""ModalPrompt's options: defaults from the official code (AuroraZengfh/ModalPrompt)."""

from __future__ import annotations

from dataclasses import dataclass

from cl_bench.errors import CLBenchError
from cl_bench.models.encoders import TEXT_FEATURES


@dataclass
class ModalPromptOptions:
    """ModalPrompt (defaults: official code; MCITlib and Prism differ where noted)."""

    prompt_length: int = 10
    """Tokens per task prompt (the official ``prefix_len`` 10; Prism 96)."""
    top_k: int = 3
    """Task prompts fused per sample (``transfer_num``: 3 in the official ``llava_arch.py``, 1 in
    MCITlib and Prism)."""
    image_weight: float = 0.5
    """lambda of the image similarity; 1 - lambda weighs the text's (0.5 in all references)."""
    encoder: str | None = None
    """The CLIP encoder: a local CLIP folder, ``llava``, or None for the suite's default."""
    text_feature: str = "pooled"
    """The CLIP text tower's ``pooled`` output (the references) or its ``projected`` embedding."""
    train_projector: bool = False
    """Also train the projector (official code and MCITlib: yes, at a tenth of the prompts'
    learning rate; Prism: no; cl-bench has one learning rate here, so off by default)."""

    def __post_init__(self) -> None:
        check_options(self)


def check_options(o: ModalPromptOptions) -> None:
    """Bad values are errors when the options are read, before any run folder or training."""
    problems = []
    if o.prompt_length < 1:
        problems.append(f"method.prompt_length={o.prompt_length}: must be >= 1")
    if o.top_k < 1:
        problems.append(f"method.top_k={o.top_k}: must be >= 1")
    if not 0 <= o.image_weight <= 1:
        problems.append(f"method.image_weight={o.image_weight}: must be in [0, 1]")
    if o.text_feature not in TEXT_FEATURES:
        problems.append(f"method.text_feature={o.text_feature!r}: expected one of {TEXT_FEATURES}")
    if problems:
        raise CLBenchError("; ".join(problems))
