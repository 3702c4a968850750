"""The ``clbench`` command line. Heavy modules are imported only by the commands that need them."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from cl_bench.errors import CLBenchError

COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {}


def command(name: str) -> Callable:
    """Register a sub-command handler."""

    def decorate(func: Callable[[argparse.Namespace], None]) -> Callable:
        COMMANDS[name] = func
        return func

    return decorate


@command("list")
def cmd_list(args: argparse.Namespace) -> None:
    from cl_bench.registry import index_methods, load_suites

    print("Suites (default order; letters for --order):")
    for suite in load_suites():
        order = " -> ".join(f"{t.name} [{t.letter}]" for t in suite.tasks)
        print(f"  {suite.name}: {suite.description}\n      {order}")
    print("Methods:")
    for entry in sorted(index_methods().values(), key=lambda e: e.name):
        print(f"  {entry.label}: {entry.summary}")
        if entry.base is None:
            print(f"      {capability_line(entry.capabilities)}")


def capability_line(caps) -> str:
    """One line of a method's declared capabilities for ``clbench list``."""
    routing = "routes per sample" if caps.routes else "one model for every input"
    return (f"trains: {caps.trains}; per task: {caps.growth}; {routing}; "
            f"launchers: {', '.join(caps.launchers)}")


@command("run")
def cmd_run(args: argparse.Namespace) -> None:
    from cl_bench import config
    from cl_bench.registry import get_suite
    from cl_bench.running.runner import run

    def suite_defaults(name: str) -> dict:
        return get_suite(name).defaults

    fields = {
        "method": args.method, "suite": args.suite, "order": args.order, "out": args.out,
        "seed": args.seed, "model": args.model, "data_root": args.data_root,
        "quick": True if args.quick else None, "general": general_option(args.general),
        "model.device": args.device,
    }
    if args.resume:
        if not args.out:
            raise CLBenchError("--resume needs --out RUN_DIR (the run folder to continue)")
        cfg = config.RunConfig(out=args.out)
    else:
        overrides = list(args.set)
        if args.limit is not None:
            overrides += [f"train.limit={args.limit}", f"eval.limit={args.limit}"]
        cfg = config.resolve(args.config, overrides, suite_defaults, **fields)
    print(run(cfg, resume=args.resume))


def general_option(value: str | None) -> str | None:
    """``--general``: comma-separated names; "none" (or "") means no general benchmarks."""
    if value is None:
        return None
    return "[]" if value.strip().lower() in ("", "none") else value


@command("report")
def cmd_report(args: argparse.Namespace) -> None:
    from reports.markdown import write_report

    print(write_report(args.run_dir))


@command("sweep-alpha")
def cmd_sweep_alpha(args: argparse.Namespace) -> None:
    from cl_bench.analysis.sweep import parse_alphas, sweep_alpha

    overrides = method_sets(args.set)
    if args.consolidation:
        overrides["consolidation"] = args.consolidation
    print(sweep_alpha(args.run_dir, args.stage, parse_alphas(args.alphas), overrides))


def method_sets(items: list[str]) -> dict[str, str]:
    """``--set method.KEY=VALUE`` items as method options (values converted by the method)."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("method."):
            raise CLBenchError(f"--set {item!r}: expected method.KEY=VALUE")
        options[key.removeprefix("method.")] = value
    return options


@command("analyze")
def cmd_analyze(args: argparse.Namespace) -> None:
    print(args.handler(args))


@command("base")
def cmd_base(args: argparse.Namespace) -> None:
    from cl_bench.running.runner import cache_dir
    from tasks.micro.base import micro_base_model

    print(micro_base_model(cache_dir(), force=args.force))


@command("data")
def cmd_data(args: argparse.Namespace) -> None:
    if args.action == "split665k":
        from tasks.llava665k import write_splits

        if not args.data_root:
            raise CLBenchError("data split665k needs --data-root PATH (where the splits go)")
        source = Path(args.source).expanduser() if args.source else None
        result = write_splits(Path(args.data_root).expanduser(), source, args.probe_size)
        print(result.table())
        return
    from cl_bench.config import RunConfig
    from cl_bench.registry import get_suite
    from cl_bench.running.runner import resolve_data_root
    from tasks.data_check import check_suite_data

    suite = get_suite(args.suite or RunConfig().suite)
    root = resolve_data_root(suite, RunConfig(suite=suite.name, data_root=args.data_root))
    report = check_suite_data(suite, root, suite.resolve_order(args.order))
    print(report.table())
    if not report.ok:
        raise CLBenchError(f"data check failed: {report.problem_count()} problem(s), listed above")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list suites (with tasks and order) and methods")

    run = sub.add_parser("run", help="run a method on a suite, stage by stage")
    run.add_argument("--method", help="method name (clbench list)")
    run.add_argument("--suite", help="suite name (default ucit-micro)")
    run.add_argument("--order", help="task order: letters (e.g. RAVICF) or comma-separated names")
    run.add_argument("--out", help="run folder (default runs/<suite>-<method>-seed<N>)")
    run.add_argument("--seed", type=int)
    run.add_argument("--model", help="local Hugging Face LLaVA folder to start from")
    run.add_argument("--device", help="auto (default: cuda:LOCAL_RANK when there is a GPU), "
                     "cpu, cuda or cuda:N")
    run.add_argument("--data-root", help="folder holding the suite's data")
    run.add_argument("--config", type=Path, help="YAML config file")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. train.learning_rate=1e-4, method.alpha=0.3")
    run.add_argument("--general", help="general benchmarks after each stage (lmms-eval task "
                     "names, comma-separated; default: the suite's own; 'none' for none)")
    run.add_argument("--limit", type=int, help="at most N train and N test samples per task")
    run.add_argument("--quick", action="store_true", help="a smoke run: few samples, few steps")
    run.add_argument("--resume", action="store_true", help="continue the run in --out")

    report = sub.add_parser("report", help="rebuild report.md of a run folder")
    report.add_argument("run_dir", type=Path)

    sweep = sub.add_parser("sweep-alpha", help="re-consolidate a stage of a run (llava_c, "
                           "modelmix: methods that consolidate stored updates) "
                           "for many alphas and re-evaluate, without retraining")
    sweep.add_argument("run_dir", type=Path)
    sweep.add_argument("--stage", type=int, required=True, help="the stage to re-consolidate")
    sweep.add_argument("--alphas", default="0:1:0.1", help="start:stop:step or a list (0,0.2)")
    sweep.add_argument("--consolidation", help="the swept stage's method.consolidation (e.g. "
                       "sac, modelmix; default: the run's)")
    sweep.add_argument("--set", action="append", default=[], metavar="method.KEY=VALUE",
                       help="another method option for the swept stage")

    from cl_bench.analysis.commands import add_analysis_parsers

    analyze = sub.add_parser("analyze", help="analyses of models and runs (cka, and those the "
                             "methods offer, e.g. layouts)")
    add_analysis_parsers(analyze.add_subparsers(dest="kind", required=True))

    data = sub.add_parser("data", help="check a suite's data folder (check), or split "
                          "llava_v1_5_mix665k.json into the llava665k tasks (split665k)")
    data.add_argument("action", choices=["check", "split665k"])
    data.add_argument("--suite", help="suite name (default ucit-micro)")
    data.add_argument("--data-root", help="the suite's data folder (default CLBENCH_DATA_ROOT)")
    data.add_argument("--order", help="check only these tasks: letters or comma-separated names")
    data.add_argument("--source", help="split665k: the mix file (default "
                      "<data-root>/llava_v1_5_mix665k.json)")
    data.add_argument("--probe-size", type=int, default=500,
                      help="split665k: test records (a retention probe) per task")

    base = sub.add_parser("base", help="the micro world's base model")
    base.add_argument("action", choices=["build"])
    base.add_argument("--force", action="store_true", help="rebuild even if cached")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except CLBenchError as err:
        print(f"clbench: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
