"""Multitask: joint training on every task at once, the usual upper bound."""

from cl_bench.method import Method, Stage
from cl_bench.registry import register_method
from tasks.suite import TaskSpec


@register_method(
    "multitask",
    launchers=("single", "ddp", "zero2"),
    paper="the joint-training upper bound of both papers",
    trains="one LoRA on the language model + the projector, on every task at once",
)
class MultiTask(Method):
    """One LoRA stage on the union of all tasks' training data, evaluated once."""

    def plan(self, tasks: list[TaskSpec]) -> list[Stage]:
        return [Stage(1, tuple(tasks))]
