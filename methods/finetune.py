"""Sequential fine-tuning: the lower bound every continual method is compared with."""

from cl_bench.method import Method
from cl_bench.registry import register_method


@register_method(
    "finetune",
    launchers=("single", "ddp", "zero2"),
    paper="LLaVA-c (Liu et al., 2025): the 'vanilla' sequential fine-tuning baseline",
    trains="a fresh LoRA on the language model + the projector each stage, merged after it",
)
class FineTune(Method):
    """Sequential LoRA fine-tuning, the LoRA merged after each stage (no anti-forgetting)."""
