"""report.md sections on base model degradation: general scores, probes, example answers."""

from __future__ import annotations

from reports.run_folder import read_records

MAX_ANSWER = 120  # characters of an example answer shown in the report


def _fmt(value, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.0f}%" if pct else f"{value:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def general_section(summary: dict) -> str:
    """Every general benchmark metric (rows) after every stage (columns)."""
    general = summary.get("general")
    if not general:
        return ""
    stages = max(len(v) for metrics in general.values() for v in metrics.values())
    rows = [
        [bench, metric, *(_fmt(v) for v in values)]
        for bench, metrics in general.items()
        for metric, values in metrics.items()
    ]
    header = ["benchmark", "metric", *(f"stage {t}" for t in range(stages))]
    return ("## General benchmarks (lmms-eval, after each stage; stage 0 = starting model)\n\n"
            + _table(header, rows))


def probes_section(summary: dict) -> str:
    """Format collapse and language shift per stage."""
    probes = summary.get("probes")
    if not probes:
        return ""
    header = ["stage", "mean words", "vs start", "median words", "short", "one word",
              "option letter", "learned tasks' format (start)", "language shift"]
    rows = [
        [str(p["stage"]), _fmt(p["mean_words"]), _fmt(p.get("length_ratio")),
         _fmt(p.get("median_words")),
         _fmt(p["short_share"], True), _fmt(p["one_word_share"], True),
         _fmt(p["option_share"], True),
         f"{_fmt(p['learned_format_share'], True)} ({_fmt(p['start_learned_format_share'], True)})",
         f"{p['language_shift']:.3f}"]
        for p in probes
    ]
    note = ("Open inquiries without format instructions (LLaVA-c, Base Model Degradation). "
            "short = at most 3 words; learned tasks' format = answers in the answer format of a "
            "task trained so far (the starting model's share in brackets); language shift = mean "
            "L2 distance of final hidden states to the starting model's (Figure 6).")
    return "## Degradation probes\n\n" + note + "\n\n" + _table(header, rows)


def examples_section(run_dir) -> str:
    """A few inquiries with the starting model's answer and each stage's (Figure 2 style)."""
    records = [r for r in read_records(run_dir) if "probes" in r]
    if not records:
        return ""
    parts = ["## Answers to open inquiries (starting model, then after each stage)"]
    for i, example in enumerate(records[0]["probes"]["examples"]):
        marker = " [with image]" if example["image"] else ""
        rows = [["start", _cell(example["start"])]]
        for r in records[1:]:
            found = r["probes"]["examples"]
            if i < len(found) and found[i]["id"] == example["id"]:
                rows.append([f"stage {r['stage']} ({'+'.join(r['trained_on'])})",
                             _cell(found[i]["answer"])])
        title = f"**{_cell(example['text'])}**{marker}"
        parts.append(title + "\n\n" + _table(["model", "answer"], rows))
    return "\n\n".join(parts)


def _cell(text: str) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    text = text if len(text) <= MAX_ANSWER else text[: MAX_ANSWER - 3] + "..."
    return text or "(empty)"
