"""The papers' orderings on ucit-micro, measured over seeds: which show and which do not.

Reads finished runs (run, grid or parent folders, as ``clbench leaderboard``): one row per
method and option variant, mean +- sample std over its seeds. Prints the rows, then each
ordering the papers report with the measured numbers and a verdict: ``shows`` when the means
differ in the papers' direction by more than the larger of the two stds (for a threshold, by
more than the row's std), ``within noise`` when by less, ``reversed`` when in the other
direction beyond it. Runs needed (``clbench run --seeds 0,1,2 --method ...``): zeroshot,
finetune, multitask, modelmix, llava_c, llava_c_sac, llava_c_uir, llava_c_fkl, llava_c_replay,
hide_llava, and llava_c with ``--set method.uir=l2`` in a folder of its own; orderings whose
runs are missing say so.

    python benchmarks/micro_phenomena.py runs/grid runs/l2 > phenomena.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from cl_bench.evaluation.probes import median_words
from reports.leaderboard import Cell, Row, Table, build_tables

MME, OPEN = "micro_mme/acc", "micro_open/score"
FORGETTING_BWT = -10.0  # finetune forgets: BWT at most this
MME_DROP = 10.0  # finetune degrades the base: micro MME falls by at least this
SHRINK = 0.7  # ... and the median probe answer is at most this fraction of the base's
MME_ALONG = f"{MME} over stages"
COLUMNS = ("Avg", "Last", "MFT", "BWT", MME, f"{MME} drop", MME_ALONG, OPEN, "median words")


@dataclass
class Verdict:
    claim: str
    measured: str
    verdict: str


def stage_median_words(run_dir: Path, stage: int) -> float | None:
    """The median words of a stage's answers to the open probes (``probes/stage_<t>.jsonl``;
    runs from before the probes recorded it)."""
    file = run_dir / "probes" / f"stage_{stage}.jsonl"
    if not file.is_file():
        return None
    return median_words([json.loads(line)["answer"] for line in file.read_text().splitlines()
                         if line])


def add_cells(table: Table) -> None:
    """Per row: the median probe answer length after the last stage (from the answers), and
    micro MME averaged over the stages after stage 0 (general ability along the sequence, not
    only at its end)."""
    for row in table.rows:
        medians = [stage_median_words(r.path, len(r.records) - 1) for r in row.runs]
        row.cells["median words"] = Cell([v for v in medians if v is not None])
        bench, metric = MME.split("/")
        series = [r.general().get(bench, {}).get(metric, [])[1:] for r in row.runs]
        row.cells[MME_ALONG] = Cell([statistics.fmean(s) for s in series
                                     if s and None not in s])


def find_row(table: Table, method: str, **options: tuple[str | None, ...]) -> Row | None:
    """The row of ``method`` whose runs' method options take one of the given values (None:
    left unset, i.e. the default)."""
    for row in table.rows:
        config = row.runs[0].config
        if row.method == method and all(
            config.get(f"method.{k}") in values for k, values in options.items()
        ):
            return row
    return None


def fmt(cell: Cell | None) -> str:
    if cell is None or cell.mean is None:
        return "-"
    return f"{cell.mean:.1f} ± {cell.std:.1f}" if cell.std is not None else f"{cell.mean:.1f}"


def judge(diff: float, noise: float) -> str:
    """``diff`` > 0 is the papers' direction."""
    if diff > noise:
        return "shows"
    return "reversed" if diff < -noise else "within noise"


def above(claim: str, high: Row | None, low: Row | None, column: str) -> Verdict:
    """The claim that ``high`` scores above ``low`` on ``column``."""
    if high is None or low is None or column not in high.cells or column not in low.cells:
        return Verdict(claim, "runs missing", "not measured")
    a, b = high.cells[column], low.cells[column]
    noise = max(a.std or 0.0, b.std or 0.0)
    measured = f"{column}: {high.label} {fmt(a)} vs {low.label} {fmt(b)}"
    return Verdict(claim, measured, judge(a.mean - b.mean, noise))


def below_threshold(claim: str, row: Row | None, column: str, limit: float,
                    at_most: bool) -> Verdict:
    """The claim that ``row``'s ``column`` is at most (or at least) ``limit``."""
    if row is None or column not in row.cells or row.cells[column].mean is None:
        return Verdict(claim, "runs missing", "not measured")
    cell = row.cells[column]
    diff = (limit - cell.mean) if at_most else (cell.mean - limit)
    sign = "<=" if at_most else ">="
    return Verdict(claim, f"{column}: {row.label} {fmt(cell)} ({sign} {limit:g})",
                   judge(diff, cell.std or 0.0))


def verdicts(table: Table) -> list[Verdict]:
    rows = {m: find_row(table, m) for m in ("finetune", "multitask", "modelmix", "hide_llava",
                                            "llava_c_sac", "llava_c_uir", "llava_c_fkl",
                                            "llava_c_replay")}
    llava_c = find_row(table, "llava_c", uir=(None, "mse"))
    l2 = find_row(table, "llava_c", uir=("l2",))
    finetune = rows["finetune"]
    start = statistics.median(
        stage_median_words(r.path, 0) or 0.0 for r in finetune.runs) if finetune else 0.0
    out = [
        below_threshold("finetune forgets (BWT clearly negative)", finetune, "BWT",
                        FORGETTING_BWT, at_most=True),
        below_threshold("finetune degrades the base: micro MME falls", finetune,
                        f"{MME} drop", MME_DROP, at_most=False),
        below_threshold(f"finetune's answers shrink (median words; base {start:g})", finetune,
                        "median words", SHRINK * start, at_most=True),
    ]
    continual = [r for r in table.rows if not r.bound]
    for row in continual:
        out.append(above(f"multitask above {row.label} (upper bound)",
                         rows["multitask"], row, "Last"))
    out += [
        above("UIR costs no new-task learning: llava_c_uir's Last not below finetune's "
              "(within noise or above holds)", rows["llava_c_uir"], finetune, "Last"),
        above("llava_c keeps general ability (open score)", llava_c, finetune, OPEN),
        above("llava_c keeps general ability (micro MME)", llava_c, finetune, MME),
        above("llava_c keeps general ability (micro MME over stages)", llava_c, finetune,
              MME_ALONG),
        above("llava_c learns: Last above finetune's", llava_c, finetune, "Last"),
        above("hide_llava's Last above finetune's", rows["hide_llava"], finetune, "Last"),
    ]
    for name in ("llava_c_sac", "llava_c_uir"):
        for column in (MME_ALONG, OPEN):
            out.append(above(f"Table 4: {name} above vanilla ({column})", rows[name],
                             finetune, column))
            out.append(above(f"Table 4: SAC & UIR above {name} ({column})", llava_c,
                             rows[name], column))
    for name in ("llava_c_fkl", "llava_c_replay"):  # LLaVA-c Figure 9, on top of SAC
        out.append(above(f"Fig. 9: {name} keeps more general ability than SAC alone ({OPEN})",
                         rows[name], rows["llava_c_sac"], OPEN))
        out.append(above(f"Fig. 9: UIR (MSE) learns more than {name} (MFT)", llava_c, rows[name],
                         "MFT"))
    out.append(above(f"Fig. 9: data replay keeps more general ability than FKL ({OPEN})",
                     rows["llava_c_replay"], rows["llava_c_fkl"], OPEN))
    for column in ("Last", OPEN):
        out.append(above(f"UIR distance: MSE (eq. 9's text) above L2 (eq. 8's norm) on "
                         f"{column} (the paper names no direction)", llava_c, l2, column))
    return out


def markdown(table: Table, found: list[Verdict]) -> str:
    lines = [f"## {table.title}", "", "| row | n | " + " | ".join(COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for row in table.rows:
        cells = " | ".join(fmt(row.cells.get(c)) for c in COLUMNS)
        lines.append(f"| {row.label} | {len(row.runs)} | {cells} |")
    lines += ["", "mean ± sample std over seeds; over stages: the mean of stages 1 to T (stage "
              "0 is the base); median words: the median length of the answers to the open "
              "probes after the last stage", "",
              "| ordering (papers) | measured | verdict |", "|---|---|---|"]
    lines += [f"| {v.claim} | {v.measured} | {v.verdict} |" for v in found]
    lines += [f"- {note}" for note in table.notes]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dirs", type=Path, nargs="+", help="run, grid or parent folders")
    args = parser.parse_args()
    for table in build_tables(args.dirs):
        if not any(row.runs for row in table.rows):
            continue  # only unfinished runs
        add_cells(table)
        print(markdown(table, verdicts(table)))


if __name__ == "__main__":
    main()
