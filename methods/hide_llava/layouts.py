"""``clbench analyze layouts``: a HiDe-LLaVA run's stages re-evaluated under other layouts.

Training does not depend on the layout (Table 3 ablations), so every stage of a finished run
re-assembled from its stored experts gives that run's exact Table 3 rows without training again.
Light to import: the CLI builds this parser for every invocation (torch loads in the handler).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cl_bench.errors import CLBenchError
from cl_bench.registry import register_analysis


@register_analysis("layouts")
def add_layouts_parser(sub: argparse._SubParsersAction) -> None:
    """``clbench analyze layouts``: a run's stages re-assembled under other layouts."""
    layouts = sub.add_parser(
        "layouts", help="a hide_llava run re-evaluated under other layouts (Table 3 ablations)",
        description="Every stage of a finished hide_llava run re-assembled from its stored "
        "experts under each layout (and --set method options) and evaluated on every task: "
        "the exact Table 3 rows of that run without training again.",
    )
    layouts.add_argument("run", type=Path, help="a hide_llava run folder")
    layouts.add_argument("--layouts", default="hide,merge_all,merge_rest,expand_all,expand_rest")
    layouts.add_argument("--set", action="append", default=[], metavar="method.KEY=VALUE",
                         help="another method option for every layout, e.g. method.text_weight=0")
    layouts.add_argument("--out", type=Path, help="output folder (default RUN/layouts)")
    layouts.set_defaults(handler=analyze_layouts)


def analyze_layouts(args: argparse.Namespace) -> Path:
    """``layouts.md`` (Avg, Last, parameters, routing) and ``layouts.json`` (with matrices)."""
    import json

    from cl_bench.cli import method_sets
    from cl_bench.method import MethodContext, parse_options
    from cl_bench.metrics import summarize
    from cl_bench.models.llava import load_llava
    from cl_bench.registry import get_suite
    from cl_bench.running.run_folder import RunFolder
    from cl_bench.running.runner import load_test_sets, resolve_data_root, resolve_model, set_seed
    from methods.hide_llava.experts import load_experts
    from methods.hide_llava.method import HiDeLLaVA, replay_stages
    from reports.markdown import markdown_table

    folder = RunFolder(args.run)
    cfg = folder.read_config()
    records = folder.records()
    if not records:
        raise CLBenchError(f"{args.run} holds no evaluated stage")
    suite = get_suite(cfg.suite)
    root = resolve_data_root(suite, cfg)
    tasks = suite.resolve_order(cfg.order)
    test_sets = load_test_sets(suite, tasks, root, cfg)
    bundle = load_llava(resolve_model(suite, cfg), cfg.model)
    experts = load_experts(args.run / "hide_llava")
    extra = method_sets(args.set)
    out = args.out or args.run / "layouts"
    zero_shot = [records[0]["scores"][t.name] for t in tasks]
    rows, table = [], {}
    for layout in [name.strip() for name in args.layouts.split(",") if name.strip()]:
        options = parse_options(HiDeLLaVA, {**cfg.method_options, **extra, "layout": layout})
        ctx = MethodContext(cfg, suite, root, bundle, out / layout)
        set_seed(cfg.seed)
        stages = replay_stages(HiDeLLaVA(options, ctx), experts, tasks, test_sets)
        matrix = [zero_shot, *[scores for scores, _ in stages]]
        metrics, info = summarize(matrix), stages[-1][1]
        routing = [v for v in (info.get("routing_accuracy") or {}).values() if v is not None]
        table[layout] = {"matrix": matrix, "metrics": metrics, "params": info.get("params")}
        params = info.get("params") or {}
        rows.append([layout, f"{metrics['Avg']:.2f}", f"{metrics['Last']:.2f}",
                     f"{params.get('lora', 0):,}", f"{params.get('total', 0):,}",
                     f"{sum(routing) / len(routing):.1f}" if routing else "-"])
    out.mkdir(parents=True, exist_ok=True)
    header = ["layout", "Avg", "Last", "LoRA params", "total params", "routing acc. (final)"]
    (out / "layouts.json").write_text(json.dumps(table, indent=1))
    (out / "layouts.md").write_text(
        f"# {args.run}: Table 3 layouts re-evaluated\n\n" + markdown_table(header, rows) + "\n"
    )
    return out
