"""Sequential fine-tuning: the lower bound every continual method is compared with."""

from cl_bench.method import Method
from cl_bench.registry import register_method


@register_method("finetune")
class FineTune(Method):
    """Sequential LoRA fine-tuning, the LoRA merged after each stage (no anti-forgetting)."""
