"""``clbench analyze KIND``: analyses of models and runs. Light to import (torch loads lazily).

``cka``: linear CKA, layer by layer, between the outputs of two models trained on different
tasks (or of one model on two tasks' inputs), or between every task model of a run whose method
keeps one per task (its ``task_models`` hook: HiDe-LLaVA), each on its own task's inputs
(HiDe-LLaVA section 4.1, Figure 1, appendix B). The other kinds are offered by methods
(``@register_analysis``, e.g. HiDe-LLaVA's ``layouts``) and found through the registry.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cl_bench.errors import CLBenchError
from cl_bench.registry import call_target, index_analyses


def add_analysis_parsers(sub: argparse._SubParsersAction) -> None:
    """The ``cka`` parser, then every method-owned analysis's."""
    add_cka_parser(sub)
    for target in index_analyses().values():
        call_target(target, sub)


def add_cka_parser(sub: argparse._SubParsersAction) -> None:
    cka = sub.add_parser(
        "cka", help="linear CKA per layer between models/tasks (HiDe-LLaVA appendix B)",
        description="Either --model-a/--model-b with --task-a/--task-b (model B defaults to "
        "model A, task B to task A), or --run RUN_DIR: every task model of a run whose method "
        "keeps one per task (hide_llava: base + that task's projector and LoRA), each on its "
        "own task's inputs.",
    )
    cka.set_defaults(handler=analyze_cka)
    cka.add_argument("--model-a", help="local LLaVA folder (default: the suite's base model)")
    cka.add_argument("--model-b", help="second LLaVA folder (default: model A)")
    cka.add_argument("--task-a", help="task whose inputs model A sees (name or letter)")
    cka.add_argument("--task-b", help="task whose inputs model B sees (default: task A)")
    cka.add_argument("--run", type=Path, help="a run folder of a method that keeps a model per "
                     "task (hide_llava): compare its task models")
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


def _task_name(suite, given: str) -> str:
    letters = {t.letter: t.name for t in suite.tasks}
    return letters.get(given, given) if len(given) == 1 else suite.task(given).name


def analyze_cka(args: argparse.Namespace) -> Path:
    """Compute the rows and write ``cka.csv``, ``cka.md`` and the heatmaps under ``--out``."""
    from cl_bench.analysis.cka import CkaSubject, pairwise, subject_features, task_samples
    from cl_bench.config import resolve
    from cl_bench.method import MethodContext
    from cl_bench.models.llava import load_llava
    from cl_bench.registry import get_method, get_suite
    from cl_bench.running.run_folder import RunFolder
    from cl_bench.running.runner import resolve_data_root, resolve_model
    from reports.cka_plot import CkaRow, write_cka_report

    if args.run:
        run_cfg = RunFolder(args.run).read_config()
        if args.suite:
            run_cfg.suite = args.suite
    else:  # the suite's model settings (e.g. the micro world's prompt format)
        run_cfg = resolve(defaults_for=lambda name: get_suite(name).defaults, suite=args.suite)
    if args.data_root:
        run_cfg.data_root = args.data_root
    suite = get_suite(run_cfg.suite)
    root = resolve_data_root(suite, run_cfg)

    def samples(task: str):
        return task_samples(suite, task, root, args.split, args.limit, args.seed)

    subjects: list[CkaSubject] = []
    if args.run:
        base = load_llava(resolve_model(suite, run_cfg), run_cfg.model)
        spec = get_method(run_cfg.method)
        method = spec.cls(spec.options(run_cfg.method_options),
                          MethodContext(run_cfg, suite, root, base, args.run))
        wanted = {_task_name(suite, t.strip()) for t in (args.tasks or "").split(",") if t.strip()}
        shared = _task_name(suite, args.inputs) if args.inputs else None
        for task, model in method.task_models(args.run, base.model):
            if not wanted or task in wanted:
                inputs = shared or task
                subjects.append(subject_features(
                    f"model({task})", model, base, inputs, samples(inputs),
                    args.features, args.batch_size,
                ))
            del model
        if len(subjects) < 2:
            raise CLBenchError(
                f"{args.run}: CKA needs two task models or more, not {len(subjects)}"
            )
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
            bundle = load_llava(path, run_cfg.model)
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

