"""Evaluation across the processes of a launcher (torchrun, deepspeed): who does which batch.

Under an initialised ``torch.distributed`` process group of N > 1 processes, a test set's batches
(the same batches a single process makes) are dealt out round-robin, each rank generates its
own, and ``gather_rows`` returns every row, in input order, to every rank. Because the batches are
the same, the predictions equal a single process's. Without a process group (or with one
process) everything runs in this process and no collective is called.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch.distributed as dist

from cl_bench.errors import CLBenchError

T = TypeVar("T")


def world() -> tuple[int, int]:
    """(rank, world size) of the process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process owns files (rank 0, or the only process)."""
    return world()[0] == 0


def my_batches(batches: Sequence[T]) -> list[T]:
    """This rank's share of ``batches``: every N-th, starting at its rank."""
    rank, size = world()
    return list(batches[rank::size])


def gather_rows(rows: list[int], values: list[T], n: int, across_ranks: bool = True) -> list[T]:
    """``values`` at input positions ``rows`` as one list of ``n`` in input order; with
    ``across_ranks``, every rank's, on every rank (one ``all_gather_object``; none without a
    process group)."""
    parts = [(rows, values)]
    if across_ranks and world()[1] > 1:
        parts = [None] * world()[1]
        dist.all_gather_object(parts, (rows, values))
    out: list = [None] * n
    for part_rows, part_values in parts:
        for row, value in zip(part_rows, part_values, strict=True):
            out[row] = value
    missing = [i for i, v in enumerate(out) if v is None]
    if missing:
        raise CLBenchError(f"sharded evaluation lost {len(missing)} of {n} rows "
                           f"(first: {missing[0]}): the ranks dealt out different batches")
    return out


def on_main(compute: Callable[[], T]) -> T:
    """``compute()`` on rank 0 only, its result (or its error) sent to every rank: files are
    written once and every rank returns the same value."""
    rank, size = world()
    if size == 1:
        return compute()
    box: list = [None]
    error: Exception | None = None
    if rank == 0:
        try:
            box[0] = (True, compute())
        except Exception as err:  # its text goes to the other ranks so that none waits forever
            error, box[0] = err, (False, f"{type(err).__name__}: {err}")
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if error is not None:
        raise error
    if not ok:
        raise CLBenchError(f"rank 0 failed: {value}")
    return value
