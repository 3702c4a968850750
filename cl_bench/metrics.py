"""Continual-learning metrics: pure functions of the accuracy matrix.

``matrix[t][j]`` (0-based ``j``) is the score (0-100) on task ``j + 1`` after training stage ``t``;
row 0 holds the zero-shot scores, so a run over T tasks has shape (T+1) x T. Definitions follow
``spec/methods-and-metrics.md`` ("Metrics over the accuracy matrix"); a metric whose index set is
empty (BWT, Forgetting and FWT when T = 1) is ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cl_bench.errors import CLBenchError
from cl_bench.registry import unknown_name_error

Matrix = Sequence[Sequence[float]] | np.ndarray
METRIC_NAMES = ("Avg", "Last", "MFT", "MAA", "BWT", "FWT", "Forgetting")
# Other names of the same quantities: MCITlib (Guo et al. 2025) reports MFT, MFN, MAA and BWT;
# its MFN (mean final accuracy) is Last, the rest are ours under the same names. HiDe-LLaVA's
# "Avg" is our Avg, not MAA.
METRIC_ALIASES = {"MFN": "Last"}


def metric_name(name: str) -> str:
    """The metric ``name`` refers to, aliases included ("MFN" -> "Last"); else an error."""
    for known in (*METRIC_NAMES, *METRIC_ALIASES):
        if name.casefold() == known.casefold():
            return METRIC_ALIASES.get(known, known)
    raise unknown_name_error("metric", name, [*METRIC_NAMES, *METRIC_ALIASES])


def aliases_of(name: str) -> list[str]:
    """Other names of metric ``name`` ("Last" -> ["MFN", ...])."""
    return [alias for alias, target in METRIC_ALIASES.items() if target == name]


def as_matrix(matrix: Matrix) -> np.ndarray:
    """The matrix as a 2-D float array with at least one row and column and finite scores."""
    try:
        arr = np.asarray(matrix, dtype=float)
    except (TypeError, ValueError) as err:
        raise CLBenchError(
            f"the accuracy matrix must be a list of equal-length rows of numbers: {err}"
        ) from None
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise CLBenchError(
            f"the accuracy matrix must be 2-D with at least one row and one task; "
            f"got shape {arr.shape}"
        )
    if not np.isfinite(arr).all():
        raise CLBenchError("the accuracy matrix has a missing (NaN) or infinite score")
    return arr


def is_continual(matrix: Matrix) -> bool:
    """True when the matrix is (T+1) x T: a zero-shot row then one row per task stage."""
    arr = as_matrix(matrix)
    return arr.shape[0] == arr.shape[1] + 1


def continual_matrix(matrix: Matrix, metric: str) -> np.ndarray:
    """The matrix as an array, checked to be (T+1) x T (else an error naming ``metric``)."""
    arr = as_matrix(matrix)
    if arr.shape[0] != arr.shape[1] + 1:
        rows, tasks = arr.shape
        raise CLBenchError(
            f"{metric} needs a (T+1) x T accuracy matrix (a zero-shot row, then one row per "
            f"task stage); got {rows} row(s) for {tasks} task(s)"
        )
    return arr


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def last(matrix: Matrix) -> float:
    """Mean score over all tasks in the final row (defined for any matrix shape)."""
    # HiDe-LLaVA Sec. 5.1 'Last' (MCITlib 'MFN'); spec: Last = mean_j R[T][j]
    return float(as_matrix(matrix)[-1].mean())


def avg(matrix: Matrix) -> float:
    """Mean over tasks of each task's score averaged over the stages since it was learned."""
    # HiDe-LLaVA Sec. 5.1 'Avg'; spec: Avg = mean_j Avg_j, Avg_j = mean_{t>=j} R[t][j]
    arr = continual_matrix(matrix, "Avg")
    tasks = arr.shape[1]
    return float(np.mean([arr[j + 1 :, j].mean() for j in range(tasks)]))


def mft(matrix: Matrix) -> float:
    """Mean score of each task right after it was learned (the diagonal)."""
    # spec: MFT = mean_j R[j][j]
    arr = continual_matrix(matrix, "MFT")
    return float(np.diagonal(arr[1:]).mean())


def maa(matrix: Matrix) -> float:
    """Mean over stages of the mean score on the tasks learned so far."""
    # CoIN / LLaVA-c 'MAA'; spec: MAA = mean_t (mean_{j<=t} R[t][j])
    arr = continual_matrix(matrix, "MAA")
    tasks = arr.shape[1]
    return float(np.mean([arr[t, :t].mean() for t in range(1, tasks + 1)]))


def bwt(matrix: Matrix) -> float | None:
    """Mean change of each earlier task from right after learning it to the end (None if T = 1)."""
    # spec: BWT = mean_{j<T} (R[T][j] - R[j][j])
    arr = continual_matrix(matrix, "BWT")
    tasks = arr.shape[1]
    return _mean([arr[tasks, j] - arr[j + 1, j] for j in range(tasks - 1)])


def forgetting(matrix: Matrix) -> list[float]:
    """Per task j < T: its best score at the stages since it was learned (j..T-1) minus its
    final score; scores before task j was learned (transfer, or the zero-shot row) never count."""
    # Chaudhry et al. 2018 (RWalk) Sec. 3: f_j = max_{t in j..T-1} R[t][j] - R[T][j]
    arr = continual_matrix(matrix, "Forgetting")
    tasks = arr.shape[1]
    return [float(arr[j + 1 : tasks, j].max() - arr[tasks, j]) for j in range(tasks - 1)]


def fwt(matrix: Matrix) -> float | None:
    """Mean gain on each task j > 1 before learning it, over its zero-shot score (None if T = 1)."""
    # spec: FWT = mean_{j>1} (R[j-1][j] - R[0][j])
    arr = continual_matrix(matrix, "FWT")
    tasks = arr.shape[1]
    return _mean([arr[j, j] - arr[0, j] for j in range(1, tasks)])


def summarize(matrix: Matrix) -> dict[str, float | None]:
    """Every metric by name; for a matrix that is not (T+1) x T only ``Last`` is defined.

    A zero-shot-only run (one row) or a multitask run (zero-shot row and one joint row) has no
    per-task stages, so ``Avg``, ``MFT``, ``MAA``, ``BWT``, ``FWT`` and ``Forgetting`` are None.
    """
    summary: dict[str, float | None] = dict.fromkeys(METRIC_NAMES)
    summary["Last"] = last(matrix)
    if not is_continual(matrix):
        return summary
    summary.update(
        Avg=avg(matrix),
        MFT=mft(matrix),
        MAA=maa(matrix),
        BWT=bwt(matrix),
        FWT=fwt(matrix),
        Forgetting=_mean(forgetting(matrix)),
    )
    return summary
