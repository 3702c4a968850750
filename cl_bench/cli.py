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
        print(f"  {entry.name}: {entry.summary}")


@command("run")
def cmd_run(args: argparse.Namespace) -> None:
    from cl_bench import config
    from cl_bench.registry import get_suite
    from cl_bench.runner import run

    def suite_defaults(name: str) -> dict:
        return get_suite(name).defaults

    fields = {
        "method": args.method, "suite": args.suite, "order": args.order, "out": args.out,
        "seed": args.seed, "model": args.model, "data_root": args.data_root,
        "quick": True if args.quick else None,
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


@command("report")
def cmd_report(args: argparse.Namespace) -> None:
    from reports.markdown import write_report

    print(write_report(args.run_dir))


@command("base")
def cmd_base(args: argparse.Namespace) -> None:
    from cl_bench.runner import cache_dir
    from tasks.micro.base import micro_base_model

    print(micro_base_model(cache_dir(), force=args.force))


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
    run.add_argument("--data-root", help="folder holding the suite's data")
    run.add_argument("--config", type=Path, help="YAML config file")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. train.learning_rate=1e-4 or method.alpha=0.3")
    run.add_argument("--limit", type=int, help="at most N train and N test samples per task")
    run.add_argument("--quick", action="store_true", help="a smoke run: few samples, few steps")
    run.add_argument("--resume", action="store_true", help="continue the run in --out")

    report = sub.add_parser("report", help="rebuild report.md of a run folder")
    report.add_argument("run_dir", type=Path)

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
