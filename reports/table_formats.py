"""Leaderboard tables as markdown, CSV, LaTeX (booktabs) and a self-contained HTML page."""

from __future__ import annotations

import base64
import html
import io

import pandas as pd

from reports.leaderboard import DECIMALS, STD_NOTE, Cell, Row, Table, lower_is_better
from reports.markdown import markdown_table

LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}"}
UP_TEX, DOWN_TEX = "$\\uparrow$", "$\\downarrow$"


def cell_text(cell: Cell | None, row: Row, pm: str = "±") -> str:
    """``mean ± std``, just the mean for one seed, ``-`` for none; ``(n=k)`` when the cell has
    fewer seeds than its row."""
    if cell is None or cell.mean is None:
        return "-"
    mean = cell.mean if round(cell.mean, DECIMALS) != 0 else 0.0  # no "-0.00"
    text = f"{mean:.{DECIMALS}f}"
    if cell.std is not None:
        text += f" {pm} {cell.std:.{DECIMALS}f}"
    return text if cell.n == len(row.runs) else f"{text} (n={cell.n})"


def arrow(column: str, up: str = "↑", down: str = "↓") -> str:
    return down if lower_is_better(column) else up


def setting_line(table: Table) -> str:
    s = table.setting
    return (f"order: {' → '.join(s['order'])} · model: {s['model'] or '(suite default)'} · "
            f"data: {s['data_root'] or '(suite default)'}")


def legend(table: Table) -> str:
    return f"{STD_NOTE}; bold: best non-bound row; ↑ higher is better, ↓ lower is better."


def to_markdown(tables: list[Table]) -> str:
    parts = []
    for table in tables:
        header = ["method", "n", *(f"{c} {arrow(c)}" for c in table.columns)]
        body = []
        for row in table.rows:
            cells = []
            for column in table.columns:
                text = cell_text(row.cells.get(column), row)
                cells.append(f"**{text}**" if table.is_best(row, column) else text)
            body.append([row.label, str(len(row.runs)), *cells])
        notes = "\n".join(f"- {n}" for n in table.notes)
        parts.append("\n\n".join(p for p in [f"## {table.title}", setting_line(table),
                                              markdown_table(header, body), legend(table), notes]
                                   if p))
    return "\n\n".join(parts) + "\n"


def to_frame(tables: list[Table]) -> pd.DataFrame:
    """One row per leaderboard row; ``<column> mean``, ``<column> std`` and ``<column> n``."""
    rows = []
    for table in tables:
        s = table.setting
        for row in table.rows:
            item = {"table": table.title, "suite": s["suite"], "order": ",".join(s["order"]),
                    "model": s["model"], "data_root": s["data_root"], "quick": s["quick"],
                    "row": row.label, "method": row.method, "kind": row.kind,
                    "n": len(row.runs), "seeds": " ".join(map(str, row.seeds))}
            for column in table.columns:
                cell = row.cells.get(column)
                item |= {f"{column} mean": cell.mean if cell else None,
                         f"{column} std": cell.std if cell else None,
                         f"{column} n": cell.n if cell else 0}
            rows.append(item)
    return pd.DataFrame(rows)


def to_csv(tables: list[Table]) -> str:
    return to_frame(tables).to_csv(index=False)


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIALS.get(ch, ch) for ch in text)


def to_latex(tables: list[Table]) -> str:
    """One booktabs ``table`` per leaderboard table (``\\usepackage{booktabs}``); best in bold."""
    parts = []
    for table in tables:
        heads = [f"{latex_escape(c)} {arrow(c, UP_TEX, DOWN_TEX)}" for c in table.columns]
        lines = [
            "\\begin{table}[t]", "\\centering", "\\small",
            f"\\caption{{{latex_escape(table.title)}: mean $\\pm$ sample std (ddof = 1) over "
            "$n$ seeds; best non-bound row in bold.}",
            f"\\begin{{tabular}}{{lr{'c' * len(table.columns)}}}", "\\toprule",
            " & ".join(["Method", "$n$", *heads]) + " \\\\", "\\midrule",
        ]
        bounds_started = False
        for row in table.rows:
            if row.bound and not bounds_started:
                lines.append("\\midrule")
                bounds_started = True
            cells = []
            for column in table.columns:
                text = cell_text(row.cells.get(column), row, "$\\pm$")
                cells.append(f"\\textbf{{{text}}}" if table.is_best(row, column) else text)
            lines.append(" & ".join([latex_escape(row.label), str(len(row.runs)), *cells])
                         + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #111; max-width: 1400px; }
table { border-collapse: collapse; margin: 0.5em 0 0.3em; font-size: 14px; }
th, td { padding: 4px 10px; text-align: right; white-space: nowrap; }
td:first-child { white-space: normal; min-width: 14em; max-width: 28em; }
.scroll { overflow-x: auto; }
th:first-child, td:first-child { text-align: left; }
thead th { border-top: 2px solid #111; border-bottom: 1px solid #111; }
tbody tr:last-child td { border-bottom: 2px solid #111; }
tr.bound td { color: #555; font-style: italic; }
tr.first-bound td { border-top: 1px solid #111; }
.setting, .legend, li { color: #444; font-size: 13px; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 13px; color: #444; }
"""


def to_html(tables: list[Table], figures: list[tuple[str, bytes]] = ()) -> str:
    """A self-contained page: the tables and each ``(caption, PNG bytes)`` figure inline."""
    esc = html.escape
    body = ["<h1>cl-bench leaderboard</h1>"]
    for table in tables:
        head = "".join(f"<th>{esc(c)} {arrow(c)}</th>" for c in table.columns)
        rows, first_bound = [], True
        for row in table.rows:
            css = ""
            if row.bound:
                css = "bound first-bound" if first_bound else "bound"
                first_bound = False
            cells = []
            for column in table.columns:
                text = esc(cell_text(row.cells.get(column), row))
                cells.append(f"<td><b>{text}</b></td>" if table.is_best(row, column)
                             else f"<td>{text}</td>")
            rows.append(f'<tr class="{css}"><td>{esc(row.label)}</td><td>{len(row.runs)}</td>'
                        + "".join(cells) + "</tr>")
        notes = "".join(f"<li>{esc(n)}</li>" for n in table.notes)
        body += [f"<h2>{esc(table.title)}</h2>",
                 f'<p class="setting">{esc(setting_line(table))}</p>',
                 f'<div class="scroll"><table><thead><tr><th>method</th><th>n</th>{head}</tr>'
                 f"</thead><tbody>{''.join(rows)}</tbody></table></div>",
                 f'<p class="legend">{esc(legend(table))}</p>',
                 f"<ul>{notes}</ul>" if notes else ""]
    if figures:
        body.append("<h2>Figures</h2>")
    for caption, png in figures:
        data = base64.b64encode(png).decode("ascii")
        body.append(f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{esc(caption)}</figcaption></figure>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>cl-bench leaderboard</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(b for b in body if b) + "\n</body></html>\n")


def png_bytes(figure) -> bytes:
    """A matplotlib figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
