"""Experience replay: past stages' training samples mixed into the current stage, on one LoRA.

A reservoir buffer (Algorithm R, Vitter 1985; the buffer of experience replay in Chaudhry et al.
2019, "On Tiny Episodic Memories in Continual Learning") holds at most ``buffer_size`` samples,
a uniform sample of every stage seen so far; after each stage the stage's training samples
stream through it with a seed of their own. Each stage trains on its own samples plus
``ratio`` times as many drawn from the buffer (seeded). Instead, as MCITlib's Replay baseline
does, a pre-sampled replay file per task can be given: its samples are mixed into that task's
stage. The model trains as ``seq_lora`` (MCITlib's Replay builds on its LoRA-FT).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import torch

from cl_bench.errors import CLBenchError
from cl_bench.method import MethodContext, Stage
from cl_bench.registry import register_method
from methods.seq_lora import SeqLoRA
from tasks.loaders import Sample, load_samples

T = TypeVar("T")


class Draws(Protocol):
    def randrange(self, stop: int) -> int: ...


@dataclass
class ReplayOptions:
    """Replay options (ER's equal mix of new and replayed samples)."""

    buffer_size: int = 1000
    """Samples the reservoir keeps over all past stages (no MLLM reference fixes one: 1000 is
    2.5-4 % of a UCIT task's training set)."""
    ratio: float = 1.0
    """Replayed samples per current sample, in [0, 1], at most the buffer (1: as many as new,
    ER's half-new, half-replayed batches, Chaudhry et al. 2019)."""
    replay_file: str | None = None
    """A pre-sampled replay file per task instead of the buffer (as MCITlib): a path holding
    {task} (the task's name), relative to the data root; its samples join that task's stage."""

    def __post_init__(self) -> None:
        if self.buffer_size < 0:
            raise CLBenchError(f"method.buffer_size={self.buffer_size}: must be >= 0")
        if not 0 <= self.ratio <= 1:
            raise CLBenchError(f"method.ratio={self.ratio}: must be in [0, 1]")
        if self.replay_file is not None and "{task}" not in self.replay_file:
            raise CLBenchError(f"method.replay_file={self.replay_file!r}: needs {{task}} in "
                               "the path (one replay file per task)")


def reservoir_update(buffer: list[T], seen: int, stream: Iterable[T], capacity: int,
                     draws: Draws) -> int:
    """Algorithm R: the buffer stays a uniform sample of every item seen; returns the count."""
    for item in stream:
        if len(buffer) < capacity:
            buffer.append(item)
        else:
            slot = draws.randrange(seen + 1)  # Algorithm R: enters w.p. capacity / (seen + 1)
            if slot < capacity:
                buffer[slot] = item
        seen += 1
    return seen


@register_method(
    "replay",
    launchers=("single", "ddp", "zero2"),
    paper="Experience replay with a reservoir buffer (Chaudhry et al., 2019; Algorithm R, "
          "Vitter 1985); MCITlib's Replay baseline",
    trains="one LoRA on the language model + the projector, carried across stages "
           "(as seq_lora), on the stage's data plus replayed past samples",
    growth="none in memory (a buffer of at most buffer_size past samples, by reference)",
)
class Replay(SeqLoRA):
    """Sequential LoRA trained on each stage's data mixed with a seeded sample of the past."""

    Options = ReplayOptions

    def __init__(self, options: ReplayOptions, context: MethodContext) -> None:
        super().__init__(options, context)
        self.buffer: list[tuple[str, int]] = []  # (task, index in its training samples)
        self.seen = 0

    def training_samples(self, stage: Stage) -> list[Sample]:
        """The stage's own samples, then the replayed ones."""
        own = super().training_samples(stage)
        return own + self.replayed(stage, len(own))

    def replayed(self, stage: Stage, own: int) -> list[Sample]:
        """This stage's replayed samples: from the replay files, else drawn from the buffer."""
        if self.options.replay_file is not None:
            return [] if stage.index == 1 else [
                s for task in stage.tasks for s in self._replay_file_samples(task)
            ]
        count = min(len(self.buffer), round(self.options.ratio * own))
        rng = random.Random(f"replay:{self.context.config.seed}:{stage.index}")
        picked = sorted(rng.sample(range(len(self.buffer)), count))
        return [self.context.train_sample(*self.buffer[i]) for i in picked]

    def after_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        """Stream the stage's own samples through the reservoir."""
        stream = [(task.name, i) for task in stage.tasks
                  for i in range(len(self.context.train_samples(task)))]
        rng = random.Random(f"reservoir:{self.context.config.seed}:{stage.index}")
        self.seen = reservoir_update(self.buffer, self.seen, stream, self.options.buffer_size,
                                     rng)
        return super().after_stage(model, stage)

    def _replay_file_samples(self, task) -> list[Sample]:
        relative = Path(self.options.replay_file.format(task=task.name))
        path = relative if relative.is_absolute() else self.context.data_root / relative
        if not path.is_file():
            raise CLBenchError(f"replay file for {task.name} not found: {path} "
                               f"(method.replay_file={self.options.replay_file!r})")
        image_root = self.context.suite.task_files(task, self.context.data_root).image_root
        return load_samples(path, image_root)

    def state(self) -> dict:
        return {"seen": self.seen, "buffer": [list(item) for item in self.buffer]}

    def load_state(self, state: dict) -> None:
        self.seen = int(state.get("seen", 0))
        self.buffer = [(str(task), int(index)) for task, index in state.get("buffer", [])]
