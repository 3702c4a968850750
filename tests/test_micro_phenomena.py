"""benchmarks/micro_phenomena.py: the verdicts on the papers' orderings, hand-computed."""

import importlib.util
import json
import sys
from pathlib import Path

from reports.leaderboard import Cell, Row

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "micro_phenomena.py"
spec = importlib.util.spec_from_file_location("micro_phenomena", SCRIPT)
phenomena = sys.modules["micro_phenomena"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(phenomena)


def row(label: str, **cells: list[float]) -> Row:
    return Row(label, label, "continual", [], {k: Cell(v) for k, v in cells.items()})


def test_verdicts_weigh_the_gap_against_the_larger_std() -> None:
    high = row("a", Last=[30.0, 34.0])  # mean 32, std 2.83
    low = row("b", Last=[27.0, 28.0, 29.0])  # mean 28, std 1
    assert phenomena.above("a over b", high, low, "Last").verdict == "shows"  # 4 > 2.83
    close = row("c", Last=[30.0, 31.0])  # mean 30.5: gap 1.5 <= 2.83
    assert phenomena.above("a over c", high, close, "Last").verdict == "within noise"
    assert phenomena.above("b over a", low, high, "Last").verdict == "reversed"
    assert phenomena.above("a over d", high, None, "Last").verdict == "not measured"
    forgets = row("f", BWT=[-12.0, -8.0])  # mean -10, std 2.83: at the limit, within noise
    assert phenomena.below_threshold("f", forgets, "BWT", -10.0, at_most=True).verdict == (
        "within noise")
    assert phenomena.below_threshold("f", forgets, "BWT", -6.0, at_most=True).verdict == "shows"
    assert phenomena.below_threshold("f", forgets, "BWT", -6.0, at_most=False).verdict == (
        "reversed")
    assert phenomena.above("a over b", high, low, "Last").measured == (
        "Last: a 32.0 ± 2.8 vs b 28.0 ± 1.0")


def test_median_words_of_a_stage(tmp_path: Path) -> None:
    probes = tmp_path / "probes"
    probes.mkdir()
    answers = ["A", "one one one one one one", "a red square", "B", "It is a cat."]
    (probes / "stage_2.jsonl").write_text(
        "\n".join(json.dumps({"id": str(i), "answer": a}) for i, a in enumerate(answers)))
    assert phenomena.stage_median_words(tmp_path, 2) == 3.0  # 1 1 3 4 6
    assert phenomena.stage_median_words(tmp_path, 3) is None
