"""``report.md``: a human-readable page built from a run folder alone."""

from __future__ import annotations

from pathlib import Path

from cl_bench.metrics import METRIC_NAMES, aliases_of
from reports.degradation import examples_section, general_section, probes_section
from reports.method_info import method_section
from reports.run_folder import read_matrix, read_records, read_summary


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def matrix_section(run_dir: Path) -> str:
    matrix = read_matrix(run_dir)
    records = {r["stage"]: r for r in read_records(run_dir)}
    header = ["stage", "trained on", *matrix.columns]
    rows = [
        [str(stage), "+".join(records[stage]["trained_on"]) or "(start)", *map(fmt, values)]
        for stage, values in zip(matrix.index, matrix.to_numpy().tolist(), strict=True)
    ]
    return "## Accuracy matrix (score after each stage)\n\n" + markdown_table(header, rows)


def metric_label(name: str) -> str:
    """A metric's name with its other names in the field: "Last (MFN)"."""
    aliases = aliases_of(name)
    return f"{name} ({', '.join(aliases)})" if aliases else name


def details_section(run_dir: Path) -> str:
    """The final stage's other views of each task's score (official and simplified VQA accuracy,
    lenient numbers, caption metrics, a failed metric as "failed") and its notes."""
    records = read_records(run_dir)
    if not records:
        return ""
    last = records[-1]
    details, notes = last.get("details", {}), last.get("notes", {})
    rows = [
        [task, fmt(last["scores"][task]),
         ", ".join(f"{k} {'failed' if v is None else fmt(v)}" for k, v in
                   details.get(task, {}).items()) or "-",
         "; ".join(notes.get(task, [])) or "-"]
        for task in last["scores"] if task in details or task in notes
    ]
    if not rows:
        return ""
    title = f"## Task metrics beside the scores (stage {last['stage']})"
    return f"{title}\n\n" + markdown_table(["task", "score", "details", "notes"], rows)


def timing_section(run_dir: Path) -> str:
    rows = [
        [str(r["stage"]), fmt(r["seconds"]["train"]), fmt(r["seconds"]["eval"]),
         fmt(r["train"].get("train_loss"))]
        for r in read_records(run_dir)
        if "seconds" in r
    ]
    if not rows:
        return ""
    return "## Stages\n\n" + markdown_table(["stage", "train s", "eval s", "train loss"], rows)


FIGURE_CAPTIONS = {
    "matrix": "Accuracy matrix and each task's change since it was learned",
    "tasks": "Each task's score across stages",
    "degradation": "General benchmarks and probes across stages",
    "spectra": "Singular values of each stage's update before and after consolidation",
}


def figures_section(run_dir: Path) -> str:
    """Draw the run's figures (``figures/*.png`` and ``.pdf``) and embed the PNGs."""
    from reports.figures import write_run_figures

    paths = write_run_figures(run_dir)
    images = [f"![{FIGURE_CAPTIONS[p.stem]}](figures/{p.name})" for p in paths]
    return "## Figures\n\n" + "\n\n".join(images) + "\n\nPDF versions beside the PNGs."


def write_report(run_dir: Path) -> Path:
    """Write ``report.md`` (and its figures) from the run folder's files."""
    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    title = f"# {summary['method']} on {summary['suite']} (seed {summary['seed']})"
    if summary.get("quick"):
        title += " -- quick run"
    headline = markdown_table([metric_label(m) for m in METRIC_NAMES],
                              [[fmt(summary.get(m)) for m in METRIC_NAMES]])
    parts = [title, headline, matrix_section(run_dir), figures_section(run_dir),
             details_section(run_dir),
             timing_section(run_dir),
             method_section(run_dir), general_section(summary), probes_section(summary),
             examples_section(run_dir)]
    path = run_dir / "report.md"
    path.write_text("\n\n".join(p for p in parts if p) + "\n")
    return path
