"""Metrics over the accuracy matrix, against hand-computed values (arithmetic in the comments)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cl_bench.errors import CLBenchError
from cl_bench.metrics import (
    METRIC_NAMES,
    avg,
    bwt,
    forgetting,
    fwt,
    last,
    maa,
    metric_name,
    mft,
    summarize,
)

# Rows: stage t = 0 (zero-shot), 1, 2, 3; columns: tasks 1, 2, 3.
R = [
    [10.0, 90.0, 30.0],  # zero-shot
    [50.0, 25.0, 35.0],  # after task 1
    [60.0, 60.0, 45.0],  # after task 2
    [30.0, 55.0, 70.0],  # after task 3
]


def test_last() -> None:
    # mean of the final row: (30 + 55 + 70) / 3 = 155 / 3
    assert last(R) == pytest.approx(155 / 3)


def test_avg() -> None:
    # Avg_1 = (50 + 60 + 30) / 3 = 140 / 3; Avg_2 = (60 + 55) / 2 = 57.5; Avg_3 = 70
    # Avg = (140/3 + 57.5 + 70) / 3 = (140 + 382.5) / 9 = 522.5 / 9 ~ 58.06
    assert avg(R) == pytest.approx(522.5 / 9)


def test_mft() -> None:
    # diagonal R[1][1], R[2][2], R[3][3]: (50 + 60 + 70) / 3 = 60
    assert mft(R) == pytest.approx(60.0)


def test_maa() -> None:
    # stage 1: 50; stage 2: (60 + 60) / 2 = 60; stage 3: 155 / 3
    # MAA = (50 + 60 + 155/3) / 3 = (330 + 155) / 9 = 485 / 9 ~ 53.89
    assert maa(R) == pytest.approx(485 / 9)


def test_bwt() -> None:
    # task 1: 30 - 50 = -20; task 2: 55 - 60 = -5; BWT = (-20 - 5) / 2 = -12.5
    assert bwt(R) == pytest.approx(-12.5)


def test_forgetting_uses_stages_before_the_last_not_zero_shot() -> None:
    # task 1: max(R[1][1], R[2][1]) - R[3][1] = max(50, 60) - 30 = 30
    # task 2: max(R[1][2], R[2][2]) - R[3][2] = max(25, 60) - 55 = 5 (zero-shot 90 not counted)
    assert forgetting(R) == pytest.approx([30.0, 5.0])


def test_forgetting_counts_only_stages_since_the_task_was_learned() -> None:
    # Task 2 scores 80 after stage 1 (transfer, before it was learned), 60 right after learning
    # it at stage 2, 55 at the end. Forgetting_2 = max(R[2][2]) - R[3][2] = 60 - 55 = 5, not
    # max(80, 60) - 55 = 25; task 1: max(50, 60) - 30 = 30.
    transfer = [
        [10.0, 90.0, 30.0],
        [50.0, 80.0, 35.0],
        [60.0, 60.0, 45.0],
        [30.0, 55.0, 70.0],
    ]
    assert forgetting(transfer) == pytest.approx([30.0, 5.0])
    assert summarize(transfer)["Forgetting"] == pytest.approx(17.5)  # (30 + 5) / 2


def test_mcitlib_names_are_aliases() -> None:
    # MCITlib's MFN (mean final accuracy) is Last; its MFT, MAA and BWT are ours by name.
    assert metric_name("MFN") == metric_name("mfn") == metric_name("Last") == "Last"
    assert [metric_name(m) for m in ("MFT", "MAA", "BWT")] == ["MFT", "MAA", "BWT"]
    assert summarize(R)[metric_name("MFN")] == pytest.approx(155 / 3)
    with pytest.raises(CLBenchError, match="unknown metric 'MNF'.*'MFN'"):
        metric_name("MNF")


def test_fwt() -> None:
    # task 2: R[1][2] - R[0][2] = 25 - 90 = -65; task 3: R[2][3] - R[0][3] = 45 - 30 = 15
    # FWT = (-65 + 15) / 2 = -25
    assert fwt(R) == pytest.approx(-25.0)


def test_summarize_three_tasks() -> None:
    summary = summarize(R)
    assert set(summary) == set(METRIC_NAMES)
    expected = {
        "Last": 155 / 3,
        "Avg": 522.5 / 9,
        "MFT": 60.0,
        "MAA": 485 / 9,
        "BWT": -12.5,
        "FWT": -25.0,
        "Forgetting": 17.5,  # (30 + 5) / 2
    }
    assert summary == pytest.approx(expected)
    assert all(type(v) is float for v in summary.values())
    json.dumps(summary)  # plain floats, ready for summary.json


def test_numpy_input_gives_the_same_summary() -> None:
    assert summarize(np.array(R)) == pytest.approx(summarize(R))


def test_one_task() -> None:
    # T = 1: zero-shot 20, after task 1 80. Last = Avg = MFT = MAA = 80; no j < T and no j > 1.
    one = [[20.0], [80.0]]
    assert last(one) == avg(one) == mft(one) == maa(one) == 80.0
    assert bwt(one) is None and fwt(one) is None and forgetting(one) == []
    summary = summarize(one)
    assert summary["Last"] == 80.0 and summary["Avg"] == 80.0
    assert summary["BWT"] is None and summary["FWT"] is None and summary["Forgetting"] is None


def test_last_task_avg_equals_its_last() -> None:
    # HiDe Table 1: the last task's Avg_T is its only score R[T][T]; with one task Avg == Last.
    assert avg([[0.0], [42.0]]) == last([[0.0], [42.0]]) == 42.0


def test_zero_shot_only_run_defines_only_last() -> None:
    # one row over three tasks: Last = (10 + 20 + 60) / 3 = 30
    summary = summarize([[10.0, 20.0, 60.0]])
    assert summary["Last"] == pytest.approx(30.0)
    assert all(summary[k] is None for k in METRIC_NAMES if k != "Last")


def test_multitask_run_defines_only_last() -> None:
    # zero-shot row and one joint row over three tasks: Last = (40 + 50 + 90) / 3 = 60
    summary = summarize([[10.0, 20.0, 30.0], [40.0, 50.0, 90.0]])
    assert summary["Last"] == pytest.approx(60.0)
    assert all(summary[k] is None for k in METRIC_NAMES if k != "Last")


@pytest.mark.parametrize(("matrix", "last_score"), [
    ([[10.0, 20.0], [40.0, 50.0]], 45.0),  # multitask over two tasks: a square matrix
    ([[70.0]], 70.0),  # zero-shot on one task
])
def test_square_matrices_are_not_continual(matrix, last_score: float) -> None:
    summary = summarize(matrix)
    assert summary["Last"] == pytest.approx(last_score)
    assert all(summary[k] is None for k in METRIC_NAMES if k != "Last")


@pytest.mark.parametrize("metric", [avg, mft, maa, bwt, forgetting, fwt])
def test_stage_metrics_need_a_continual_matrix(metric) -> None:
    with pytest.raises(CLBenchError, match=r"\(T\+1\) x T .*got 2 row\(s\) for 3 task\(s\)"):
        metric([[10.0, 20.0, 30.0], [40.0, 50.0, 90.0]])


@pytest.mark.parametrize(
    "bad, message",
    [
        ([], "2-D"),
        ([[]], "2-D"),
        ([1.0, 2.0], "2-D"),
        ([[1.0, 2.0], [3.0]], "equal-length rows"),
        ([[1.0], [float("nan")]], "NaN"),
        ([["x"], [1.0]], "numbers"),
    ],
)
def test_malformed_matrices_are_clear_errors(bad, message) -> None:
    with pytest.raises(CLBenchError, match=message):
        summarize(bad)
