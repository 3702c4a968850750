"""Zero-shot: the starting model, never trained."""

from cl_bench.method import Method, Stage
from cl_bench.registry import register_method
from tasks.suite import TaskSpec


@register_method(
    "zeroshot",
    launchers=("single", "ddp", "zero2"),
    paper="the zero-shot lower bound of both papers",
    trains="nothing",
)
class ZeroShot(Method):
    """The starting model evaluated on every task without training (row 0 only)."""

    uses_lora = False

    def plan(self, tasks: list[TaskSpec]) -> list[Stage]:
        return []
