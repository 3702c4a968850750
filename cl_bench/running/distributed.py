"""The processes of a run under a launcher (torchrun, ``clbench run --nproc N``, deepspeed).

One run is N identical processes: every rank loads the model, trains its share of each global
batch and repeats the method's between-stage work (merging, anchors, buffers: deterministic, so
the same on every rank) and evaluates its share of each test set
(``cl_bench.evaluation.sharding``). Rank 0 alone owns the run folder; the other ranks wait at a
barrier while it writes. A rank that fails exits with its error and the launcher stops the
others; files appear atomically (``cl_bench.running.atomic``), so a stopped run leaves nothing
half-written.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# rank 0 may work alone for long (writing 7B checkpoints, scoring) while the others wait
BARRIER_TIMEOUT = timedelta(hours=int(os.environ.get("CLBENCH_BARRIER_HOURS", "6")))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Whether this process owns the run folder (rank 0, or the only process)."""
    return rank() == 0


def launched() -> bool:
    """Whether this process is one of several started by a launcher."""
    return world_size() > 1


def init_processes(device: torch.device) -> None:
    """Join the launcher's process group (NCCL on CUDA, gloo on the CPU) with a timeout long
    enough for rank 0's writing; nothing without a launcher or when already joined."""
    if not launched() or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=BARRIER_TIMEOUT)


def barrier() -> None:
    """Wait for every rank (nothing in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def on_main(work: Callable[[], T]) -> T | None:
    """Run ``work`` on rank 0 only while the other ranks wait; its result on rank 0, None on
    the others. A failure on rank 0 ends rank 0; the launcher then stops the others."""
    result = work() if is_main() else None
    barrier()
    return result


def from_main(work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0 only and hand its result (it must pickle) to every rank."""
    result = work() if is_main() else None
    if not (dist.is_available() and dist.is_initialized()):
        return result
    box = [result]
    dist.broadcast_object_list(box, src=0)
    return box[0]
