"""``clbench analyze KIND``: analyses of models and runs. Light to import (torch loads lazily).

``cka``: linear CKA, layer by layer, between the outputs of two models trained on different
tasks (or of one model on two tasks' inputs), or between every task model of a HiDe-LLaVA run,
each on its own task's inputs (HiDe-LLaVA section 4.1, Figure 1, appendix B).
``layouts``: a HiDe-LLaVA run's stages re-evaluated under other layouts (Table 3 ablations).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from cl_bench.errors import CLBenchError

ANALYSES: dict[str, Callable[[argparse.Namespace], object]] = {}


def add_analysis_parsers(sub: argparse._SubParsersAction) -> None:
    cka = sub.add_parser(
        "cka", help="linear CKA per layer between models/tasks (HiDe-LLaVA appendix B)",
        description="Either --model-a/--model-b with --task-a/--task-b (model B defaults to "
        "model A, task B to task A), or --run RUN_DIR: every task model of a hide_llava run "
        "(base + that task's projector and LoRA), each on its own task's inputs.",
    )
    cka.add_argument("--model-a", help="local LLaVA folder (default: the suite's base model)")
    cka.add_argument("--model-b", help="second LLaVA folder (default: model A)")
    cka.add_argument("--task-a", help="task whose inputs model A sees (name or letter)")
    cka.add_argument("--task-b", help="task whose inputs model B sees (default: task A)")
    cka.add_argument("--run", type=Path, help="a hide_llava run folder: compare its task models")
    cka.add_argument("--tasks", help="with --run: comma-separated tasks (default: all)")
    cka.add_argument("--inputs", help="with --run: every task model on this task's inputs "
                     "(default: each model on its own task's inputs)")
    cka.add_argument("--suite", help="suite of the tasks (default: the run's, or ucit-micro)")
    cka.add_argument("--data-root", help="the suite's data folder (default as for clbench run)")
    cka.add_argument("--split", choices=["test", "train"], default="test")
    cka.add_argument("--limit", type=int, default=64, help="samples per task (default 64)")
    cka.add_argument("--features", choices=["mlp", "block"], default="mlp",
                     help="mlp: each layer's MLP output (reference code); block: layer output")
    cka.add_argument("--batch-size", type=int, default=16)
    cka.add_argument("--seed", type=int, default=0, help="seed of the sample subset")
    cka.add_argument("--out", type=Path, required=True, help="output folder")
    add_layouts_parser(sub)


def _task_name(suite, given: str) -> str:
    letters = {t.letter: t.name for t in suite.tasks}
    return letters.get(given, given) if len(given) == 1 else suite.task(given).name


def analyze_cka(args: argparse.Namespace) -> Path:
    """Compute the rows and write ``cka.csv``, ``cka.md`` and the heatmaps under ``--out``."""
    from cl_bench.cka import CkaSubject, pairwise, subject_features, task_samples
    from cl_bench.config import RunConfig
    from cl_bench.models import load_llava
    from cl_bench.registry import get_suite
    from cl_bench.runner import RunFolder, resolve_data_root, resolve_model
    from reports.cka_plot import CkaRow, write_cka_report

    run_cfg = RunFolder(args.run).read_config() if args.run else RunConfig()
    if args.suite:
        run_cfg.suite = args.suite
    if args.data_root:
        run_cfg.data_root = args.data_root
    suite = get_suite(run_cfg.suite)
    root = resolve_data_root(suite, run_cfg)

    def samples(task: str):
        return task_samples(suite, task, root, args.split, args.limit, args.seed)

    subjects: list[CkaSubject] = []
    if args.run:
        from methods.hide_llava import expert_model, load_experts

        base = load_llava(resolve_model(suite, run_cfg))
        experts = load_experts(args.run / "hide_llava")
        if args.tasks:
            wanted = {_task_name(suite, t.strip()) for t in args.tasks.split(",")}
            experts = [e for e in experts if e.task in wanted]
        if len(experts) < 2:
            raise CLBenchError(f"{args.run}: CKA needs two task models or more, not {len(experts)}")
        shared = _task_name(suite, args.inputs) if args.inputs else None
        for expert in experts:
            model = expert_model(base.model, expert)
            inputs = shared or expert.task
            subjects.append(subject_features(
                f"model({expert.task})", model, base, inputs, samples(inputs),
                args.features, args.batch_size,
            ))
            del model
        title = f"Linear CKA between the task models of {args.run}"
        if shared:
            for s in subjects:  # label pairs by model when every model sees the same inputs
                s.model, s.task = shared, s.model
            title += f", all on {shared} inputs"
    else:
        if not args.task_a:
            raise CLBenchError("analyze cka: give --task-a (and --task-b), or --run RUN_DIR")
        task_a = _task_name(suite, args.task_a)
        task_b = _task_name(suite, args.task_b or args.task_a)
        path_a = Path(args.model_a) if args.model_a else resolve_model(suite, run_cfg)
        path_b = Path(args.model_b) if args.model_b else path_a
        if path_a == path_b and task_a == task_b:
            raise CLBenchError("analyze cka: the same model on the same task is trivially 1")
        for label, path, task in (("A", path_a, task_a), ("B", path_b, task_b)):
            bundle = load_llava(path)
            subjects.append(subject_features(
                f"{label}={path.name}", bundle.model, bundle, task, samples(task),
                args.features, args.batch_size,
            ))
        if path_a == path_b:
            for s in subjects:
                s.model = path_a.name
        title = f"Linear CKA: {path_a.name} on {task_a} vs {path_b.name} on {task_b}"
    rows = [CkaRow(a.model, a.task, b.model, b.task, layer, value)
            for a, b, layer, value in pairwise(subjects)]
    paths = write_cka_report(rows, args.out, f"{title} ({args.features} outputs, {args.split})")
    return paths[0].parent


ANALYSES["cka"] = analyze_cka


def add_layouts_parser(sub: argparse._SubParsersAction) -> None:
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


def analyze_layouts(args: argparse.Namespace) -> Path:
    """``layouts.md`` (Avg, Last, parameters, routing) and ``layouts.json`` (with matrices)."""
    import json

    from cl_bench.method import MethodContext, parse_options
    from cl_bench.metrics import summarize
    from cl_bench.models import load_llava
    from cl_bench.registry import get_suite
    from cl_bench.runner import (
        RunFolder,
        load_test_sets,
        resolve_data_root,
        resolve_model,
        set_seed,
    )
    from methods.hide_llava import HiDeLLaVA, load_experts, replay_stages
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
    bundle = load_llava(resolve_model(suite, cfg))
    experts = load_experts(args.run / "hide_llava")
    extra = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("method."):
            raise CLBenchError(f"--set {item!r}: expected method.KEY=VALUE")
        extra[key.removeprefix("method.")] = value
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


ANALYSES["layouts"] = analyze_layouts
