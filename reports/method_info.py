"""The report's method section: each stage record's ``method`` diagnostics and ``routing/``."""

from __future__ import annotations

import csv
from pathlib import Path

from reports.run_folder import read_records


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    from reports.markdown import markdown_table

    return markdown_table(header, rows)


def routing_table(run_dir: Path) -> str:
    """The last stage's routing confusion matrix (evaluated task x routed task), if any."""
    files = sorted((run_dir / "routing").glob("stage_*.csv"),
                   key=lambda p: int(p.stem.removeprefix("stage_")))
    if not files:
        return ""
    with open(files[-1], newline="") as f:
        header, *rows = list(csv.reader(f))
    title = f"### Routing after {files[-1].stem.replace('_', ' ')} (samples; rows: evaluated task)"
    return f"{title}\n\n" + _table(header, [[c or "-" for c in row] for row in rows])


def method_section(run_dir: Path) -> str:
    """Scalars of the last record, one stage x key table per dict of scalars, the routing."""
    records = [r for r in read_records(run_dir) if r.get("method")]
    if not records:
        return ""
    last = records[-1]["method"]
    parts = ["## Method diagnostics"]
    scalars = [f"- {key}: {_cell(value)}" for key, value in last.items()
               if not isinstance(value, dict | list)]
    if scalars:
        parts.append("\n".join(scalars))
    for key, value in last.items():
        if not isinstance(value, dict):
            continue
        columns = list(dict.fromkeys(k for r in records for k in r["method"].get(key) or {}))
        rows = [[str(r["stage"]), *[_cell((r["method"].get(key) or {}).get(c)) for c in columns]]
                for r in records if isinstance(r["method"].get(key), dict)]
        parts.append(f"### {key} (per stage)\n\n" + _table(["stage", *columns], rows))
    parts.append(routing_table(run_dir))
    return "\n\n".join(p for p in parts if p)
