"""``clbench leaderboard``: tables in the asked format, comparison figures saved or embedded."""

from __future__ import annotations

from pathlib import Path

from cl_bench.errors import CLBenchError
from reports.figures import comparison_figures
from reports.leaderboard import build_tables
from reports.style import pyplot, save
from reports.table_formats import png_bytes, to_csv, to_html, to_latex, to_markdown

FORMATS = {"md": to_markdown, "csv": to_csv, "latex": to_latex}


def leaderboard(paths: list[Path], fmt: str = "md", per_task: bool = False,
                figures_dir: Path | None = None) -> str:
    """The leaderboard of the runs at or below ``paths`` as text; the HTML page embeds the
    comparison figures, and ``figures_dir`` receives them as PNG and PDF."""
    if fmt not in (*FORMATS, "html"):
        raise CLBenchError(f"--format {fmt!r}: expected one of md, csv, latex, html")
    tables = build_tables(paths, per_task)
    if fmt != "html" and figures_dir is None:
        return FORMATS[fmt](tables)
    embedded = []
    for name, caption, figure in comparison_figures(tables):
        if fmt == "html":
            embedded.append((caption, png_bytes(figure)))
        if figures_dir is not None:
            save(figure, Path(figures_dir) / name)
        pyplot().close(figure)
    return to_html(tables, embedded) if fmt == "html" else FORMATS[fmt](tables)
