"""The method plugin interface: a small set of hooks into the one sequential runner.

The runner calls, for each stage of ``plan``: ``before_stage`` -> training on
``training_samples`` (``before_train_batch`` before each batch's forward) with ``extra_losses``
added to the LLaVA loss -> ``after_stage`` (consolidation) -> ``save`` (the stage checkpoint,
before evaluating, so that a crash in the evaluation keeps the training) -> evaluation of every
task on ``eval_model`` (``before_generate`` before each generation batch) ->
``after_evaluation``. A method sees only the current stage's tasks, never the future ones.

Tensors a method makes itself go to the device of the model they meet
(``cl_bench.models.placement.to_model``); what it accumulates across stages stays float32.

Two optional hooks serve the generic analyses of a finished run: ``consolidation`` (methods that
mix each stage's stored update with a ratio alpha: ``clbench sweep-alpha``) and ``task_models``
(methods that keep one model per task: ``clbench analyze cka --run``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, get_type_hints

import torch

from cl_bench.config import RunConfig, convert_value
from cl_bench.errors import CLBenchError
from cl_bench.models.checkpoint import load_model_state, save_model_state, trained_names
from cl_bench.models.deltas import LoraFactors
from cl_bench.models.llava import ModelBundle
from cl_bench.models.lora import add_lora, merge_lora
from tasks.loaders import Sample, load_samples
from tasks.suite import Suite, TaskSpec


@dataclass(frozen=True)
class Stage:
    """One training stage: its 1-based index and the tasks it trains on."""

    index: int
    tasks: tuple[TaskSpec, ...]

    @property
    def name(self) -> str:
        return "+".join(t.name for t in self.tasks)


@dataclass
class MethodContext:
    """What a method may use: the config, the suite's data and the starting model.

    ``trained`` names the full parameters any stage trained (the projector): a checkpoint keeps
    their values beside the consolidated updates.
    """

    config: RunConfig
    suite: Suite
    data_root: Path
    bundle: ModelBundle
    run_dir: Path
    trained: set[str] = field(default_factory=set)
    _cache: dict = field(default_factory=dict, repr=False)

    def note_trainable(self, model: torch.nn.Module) -> None:
        """Remember the full parameters ``model`` is about to train."""
        self.trained |= trained_names(model)

    def train_samples(self, task: TaskSpec) -> list[Sample]:
        if task.name not in self._cache:
            files = self.suite.task_files(task, self.data_root)
            self._cache[task.name] = load_samples(files.train, files.image_root)
        return self._cache[task.name]

    def suite_file(self, relative: str | None, what: str) -> Path:
        """A file of the suite under the data root (inquiries, probes)."""
        if relative is None:
            raise CLBenchError(f"suite {self.suite.name} defines no {what} file")
        return self.data_root / relative


@dataclass
class NoOptions:
    """A method without options."""


class Method:
    """Base class; defaults implement sequential LoRA fine-tuning merged after each stage."""

    Options: ClassVar[type] = NoOptions
    uses_lora: ClassVar[bool] = True

    def __init__(self, options: Any, context: MethodContext) -> None:
        self.options = options
        self.context = context

    # -- plan ------------------------------------------------------------------------------
    def plan(self, tasks: list[TaskSpec]) -> list[Stage]:
        """The training stages: one per task, in order."""
        return [Stage(i + 1, (task,)) for i, task in enumerate(tasks)]

    # -- hooks -----------------------------------------------------------------------------
    def before_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        """Prepare the model to train: a fresh LoRA on the language model."""
        return add_lora(model, self.context.config.lora) if self.uses_lora else model

    def training_samples(self, stage: Stage) -> list[Sample]:
        return [s for task in stage.tasks for s in self.context.train_samples(task)]

    def before_train_batch(
        self, model: torch.nn.Module, prompts: Sequence[tuple[str, Any]]
    ) -> None:
        """Called before each training batch's forward on ``model`` (the one ``before_stage``
        returned) with the batch's rows as ``(first question, PIL image or None)``, in row order:
        the training twin of ``before_generate``, e.g. to compute per-sample query features."""

    def extra_losses(self, model: torch.nn.Module, inputs: dict, outputs: Any) -> dict:
        """Terms added to the LLaVA loss at every training step, by name."""
        return {}

    def after_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        """Consolidate after training: the LoRA becomes part of the model (float32 factors
        beside low-precision weights, merged into float32 ones: ``cl_bench.models.updates``)."""
        return merge_lora(model)

    def eval_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as the method assembles it for evaluation."""
        return model

    def before_generate(
        self, model: torch.nn.Module, prompts: Sequence[tuple[str, Any]], label: str
    ) -> None:
        """Called before each generation batch on ``eval_model``'s model with the batch's
        ``(question, PIL image or None)`` prompts, e.g. to route by input. ``label`` names the
        evaluated set for diagnostics only: never a task id to route by."""

    def after_evaluation(self, stage: Stage) -> dict:
        """Diagnostics of the stage's evaluation, stored in its record under ``method`` (JSON)."""
        return {}

    # -- analyses of a finished run --------------------------------------------------------
    def consolidation(
        self, update: LoraFactors | torch.Tensor
    ) -> Callable[[float | None], LoraFactors | torch.Tensor]:
        """For methods that consolidate each stage's stored update (``deltas/``) with a mix ratio:
        a function from alpha (None: the run's own) to the consolidated update (factors for a
        LoRA update, a tensor for a full one), so that an alpha sweep decomposes each update
        once."""
        raise CLBenchError(
            f"method {self.context.config.method} does not consolidate stored stage updates "
            "with a mix ratio alpha"
        )

    def task_models(
        self, run_dir: Path, model: torch.nn.Module
    ) -> Iterator[tuple[str, torch.nn.Module]]:
        """For methods that keep one model per task: (task, that task's model built on the
        starting ``model``) for each task of the run in ``run_dir``, one at a time."""
        raise CLBenchError(
            f"method {self.context.config.method} keeps no per-task models to analyse"
        )

    # -- checkpoints -----------------------------------------------------------------------
    def save(self, model: torch.nn.Module, folder: Path) -> None:
        """Everything needed to resume after this stage: what changed in ``model`` since the
        starting model (its consolidated updates and trained parameters, with a pointer to the
        starting model's folder: ``cl_bench.models.checkpoint``) and ``state()``. A method
        keeping more (e.g. per-task experts) extends this and ``load``."""
        ctx = self.context
        save_model_state(model, folder, ctx.bundle.path, ctx.trained)
        (folder / "method_state.json").write_text(json.dumps(self.state()))

    def load(self, folder: Path) -> torch.nn.Module:
        """The model of a checkpoint, rebuilt on the freshly loaded starting model, and the
        method's state."""
        state = folder / "method_state.json"
        self.load_state(json.loads(state.read_text()) if state.exists() else {})
        ctx = self.context
        ctx.trained |= load_model_state(ctx.bundle.model, folder, ctx.bundle.path)
        return ctx.bundle.model

    def state(self) -> dict:
        """Method state (JSON) beyond the model weights. Saved with every stage checkpoint and
        every Trainer checkpoint (``train.save_steps``), so it must describe the method at
        that point, mid-stage included."""
        return {}

    def load_state(self, state: dict) -> None:
        """Restore what ``state`` returned (at a stage's end, or mid-stage on resume)."""


def parse_options(method: type[Method], given: dict[str, Any]) -> Any:
    """The method's Options dataclass from ``method.X`` config keys; unknown keys are errors.

    The runner parses options before it creates the run folder: an Options dataclass that checks
    its values in ``__post_init__`` (raising CLBenchError) stops a bad run before any work.
    """
    names = {f.name for f in dataclasses.fields(method.Options)}
    unknown = sorted(set(given) - names)
    if unknown:
        known = ", ".join(sorted(names)) or "none"
        raise CLBenchError(f"unknown option(s) method.{unknown[0]} for this method; known: {known}")
    hints = _hints(method.Options)
    values = {
        k: convert_value(v, hints[k], f"method.{k}", "method options") for k, v in given.items()
    }
    return method.Options(**values)


@cache
def _hints(options: type) -> dict:
    return get_type_hints(options)
