"""The ``clbench`` command line. Heavy modules are imported only by the commands that need them."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cl_bench.errors import CLBenchError

if TYPE_CHECKING:
    from cl_bench.running.grid import Grid

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

    if args.markdown:
        from cl_bench.method_table import methods_markdown

        print(methods_markdown(), end="")
        return
    print("Suites (default order; letters for --order):")
    for suite in load_suites():
        order = " -> ".join(f"{t.name} [{t.letter}]" for t in suite.tasks)
        print(f"  {suite.name}: {suite.description}\n      {order}")
    print("Methods:")
    for entry in sorted(index_methods().values(), key=lambda e: e.name):
        print(f"  {entry.label}: {entry.summary}")
        if entry.base is None:
            print(f"      paper: {entry.capabilities.paper}")
            print(f"      {capability_line(entry.capabilities)}")


def capability_line(caps) -> str:
    """One line of a method's declared capabilities for ``clbench list``."""
    routing = "routes per sample" if caps.routes else "one model for every input"
    task_id = "needs the task id at test" if caps.task_id else "no task id at test"
    return (f"trains: {caps.trains}; per task: {caps.growth}; {routing}; {task_id}; "
            f"launchers: {', '.join(caps.launchers)}")


@command("run")
def cmd_run(args: argparse.Namespace) -> None:
    from cl_bench import config
    from cl_bench.registry import get_suite
    from cl_bench.running import grid
    from cl_bench.running.runner import run

    def suite_defaults(name: str) -> dict:
        return get_suite(name).defaults

    fields = {
        "method": args.method, "suite": args.suite, "order": args.order, "out": args.out,
        "seed": args.seed, "model": args.model, "data_root": args.data_root,
        "quick": True if args.quick else None, "general": general_option(args.general),
        "report_to": args.report_to,
        "model.device": args.device, "train.deepspeed": args.deepspeed,
    }
    if args.nproc is not None and not launched():
        from cl_bench.running.launch import relaunch

        code = relaunch(without_nproc(args.argv), args.nproc)
        if code:
            raise CLBenchError(f"the run under torchrun --nproc_per_node {args.nproc} failed "
                               f"(exit status {code}; its error is above)")
        return
    if args.resume:
        if not args.out:
            raise CLBenchError("--resume needs --out RUN_DIR (the run folder to continue)")
        if (Path(args.out) / "grid.json").exists():
            return run_grid_command(grid.Grid.reopen(Path(args.out)))
        return report_path(run(config.RunConfig(out=args.out), resume=True, force=args.force,
                               overrides=args.set))
    overrides = list(args.set)
    if args.limit is not None:
        overrides += [f"train.limit={args.limit}", f"eval.limit={args.limit}"]
    methods = grid.parse_methods(args.method)
    if args.seeds is not None or len(methods) > 1:
        if launched():
            raise CLBenchError("a grid (several methods or --seeds) runs one process per "
                               "run: launch each run under torchrun or --nproc instead")
        fields["method"] = methods[0]
        template = config.resolve(args.config, overrides, suite_defaults, **fields)
        seeds = grid.parse_seeds(args.seeds) if args.seeds else [template.seed]
        out = Path(args.out or f"runs/{template.suite}-grid")
        return run_grid_command(grid.Grid.create(template, methods, seeds, out))
    report_path(run(config.resolve(args.config, overrides, suite_defaults, **fields)))


def report_path(path: Path) -> None:
    """Print the run folder (once, from rank 0 under a launcher)."""
    from cl_bench.running.distributed import is_main

    if is_main():
        print(path)


def without_nproc(argv: list[str]) -> list[str]:
    """The command line without ``--nproc N`` (what each launched process runs)."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            kept.append(item)
    return kept


def launched() -> bool:
    from cl_bench.running.distributed import launched as under_launcher

    return under_launcher()


def run_grid_command(spec: Grid) -> None:
    """Run a grid; print how each run ended; an error (exit 2) if any failed."""
    from cl_bench.running.grid import outcome_table, run_grid

    outcomes = run_grid(spec)
    print(outcome_table(spec, outcomes))
    failed = [o.name for o in outcomes if o.status == "failed"]
    if failed:
        raise CLBenchError(f"{len(failed)} of {len(outcomes)} grid run(s) failed: "
                           f"{', '.join(failed)} (errors above and in {spec.out / 'grid.json'})")


def general_option(value: str | None) -> str | None:
    """``--general``: comma-separated names; "none" (or "") means no general benchmarks."""
    if value is None:
        return None
    return "[]" if value.strip().lower() in ("", "none") else value


@command("report")
def cmd_report(args: argparse.Namespace) -> None:
    from reports.markdown import write_report

    print(write_report(args.run_dir))


@command("leaderboard")
def cmd_leaderboard(args: argparse.Namespace) -> None:
    from reports.publish import leaderboard

    text = leaderboard(args.dirs, args.format, args.per_task, args.figures)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(args.out)
    else:
        print(text, end="")


@command("sweep-alpha")
def cmd_sweep_alpha(args: argparse.Namespace) -> None:
    from cl_bench.analysis.sweep import parse_alphas, sweep_alpha

    overrides = method_sets(args.set)
    if args.consolidation:
        overrides["consolidation"] = args.consolidation
    print(sweep_alpha(args.run_dir, args.stage, parse_alphas(args.alphas), overrides))


@command("alpha-regions")
def cmd_alpha_regions(args: argparse.Namespace) -> None:
    from reports.alpha_regions import alpha_regions, read_sweep

    sweeps = []
    for item in args.sweeps:
        label, sep, folder = item.rpartition("=")
        sweeps.append(read_sweep(Path(folder), label if sep else None))
    print(alpha_regions(sweeps, args.general, args.tolerance, args.out), end="")


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
    from cl_bench.running.runner import cache_dir, resolve_data_root
    from tasks.data_check import check_suite_data

    suite = get_suite(args.suite or RunConfig().suite)
    root = resolve_data_root(suite, RunConfig(suite=suite.name, data_root=args.data_root))
    cache = None if args.no_cache else cache_dir() / "verified-images"
    report = check_suite_data(suite, root, suite.resolve_order(args.order), args.fast, cache)
    print(report.table())
    if not report.ok:
        raise CLBenchError(f"data check failed: {report.problem_count()} problem(s), listed above")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="list suites (with tasks and order) and methods")
    listing.add_argument("--markdown", action="store_true", help="print docs/methods.md: every "
                         "method's paper, capabilities, variants and options (imports them)")

    run = sub.add_parser("run", help="run a method on a suite, stage by stage")
    run.add_argument("--method", help="method name (clbench list); several, comma-separated, "
                     "run a grid")
    run.add_argument("--seeds", help="comma-separated seeds (e.g. 0,1,2): run a grid of every "
                     "method x seed, one run folder each under --out")
    run.add_argument("--suite", help="suite name (default ucit-micro)")
    run.add_argument("--order", help="task order: letters (e.g. RAVICF) or comma-separated names")
    run.add_argument("--out", help="run folder (default runs/<suite>-<method>-seed<N>), or a "
                     "grid's folder (default runs/<suite>-grid)")
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
    run.add_argument("--report-to", help="experiment trackers, comma-separated: tensorboard, "
                     "wandb (default none; wandb follows WANDB_MODE, e.g. offline)")
    run.add_argument("--limit", type=int, help="at most N train and N test samples per task")
    run.add_argument("--quick", action="store_true", help="a smoke run: few samples, few steps")
    run.add_argument("--resume", action="store_true",
                     help="continue the run (or grid) in --out (--set may change its config: "
                     "refused without --force)")
    run.add_argument("--force", action="store_true", help="--resume even though the config "
                     "or the code version changed since the run started")
    run.add_argument("--nproc", type=int, help="run in N processes (one per GPU): relaunches "
                     "itself under torchrun --nproc_per_node N (DDP unless --deepspeed)")
    run.add_argument("--deepspeed", help="train through DeepSpeed: zero2, zero2_offload "
                     "(shipped configs) or a JSON config file; ZeRO-3 only for methods that "
                     "declare it (clbench list)")

    report = sub.add_parser("report", help="rebuild report.md of a run folder")
    report.add_argument("run_dir", type=Path)

    board = sub.add_parser("leaderboard", help="compare runs: one table per suite and setting, "
                           "mean +- std over seeds")
    board.add_argument("dirs", type=Path, nargs="+", help="run folders, grid folders, or "
                       "folders holding runs")
    board.add_argument("--format", choices=["md", "csv", "latex", "html"], default="md")
    board.add_argument("--per-task", action="store_true",
                       help="the final score of every task (instead of the CL metrics)")
    board.add_argument("--out", type=Path, help="write to this file instead of printing")
    board.add_argument("--figures", type=Path,
                       help="also save the comparison figures (PNG and PDF) in this folder")

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

    regions = sub.add_parser(
        "alpha-regions", help="LLaVA-c Figure 4's General-stable, Task-stable and Ideal "
        "regions from alpha sweeps (same label over seeds: averaged)")
    regions.add_argument("sweeps", nargs="+", metavar="[LABEL=]SWEEP_DIR",
                         help="sweep folders (RUN/sweeps/stage_N[_options]); the label "
                         "defaults to the run's method and the swept options")
    regions.add_argument("--general", metavar="BENCH/METRIC",
                         help="the general score (e.g. micro_mme/acc; default: the first)")
    regions.add_argument("--tolerance", type=float, default=0.1,
                         help="a score holds while within this fraction of its alpha 0-1 "
                         "swing of its value at the region's fixed end (default 0.1)")
    regions.add_argument("--out", type=Path, help="also write alpha_regions.md and the figure "
                         "(PNG, PDF) in this folder")

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
    data.add_argument("--fast", action="store_true",
                      help="check: only look images up instead of opening and decoding them")
    data.add_argument("--no-cache", action="store_true",
                      help="check: decode every image, even those verified before unchanged")
    data.add_argument("--source", help="split665k: the mix file (default "
                      "<data-root>/llava_v1_5_mix665k.json)")
    data.add_argument("--probe-size", type=int, default=500,
                      help="split665k: test records (a retention probe) per task")

    base = sub.add_parser("base", help="the micro world's base model")
    base.add_argument("action", choices=["build"])
    base.add_argument("--force", action="store_true", help="rebuild even if cached")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        COMMANDS[args.command](args)
    except CLBenchError as err:
        print(f"clbench: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
