"""Grids: every method x seed of one configuration, each in its own run folder under one grid
folder, with a manifest (``grid.json``) that says which runs belong to the grid and how they
ended. Re-running the same grid skips finished runs and resumes interrupted ones; a failed run is
reported and the grid goes on.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from cl_bench.config import RunConfig, from_dict, to_dict
from cl_bench.errors import CLBenchError
from cl_bench.registry import get_method
from cl_bench.running.runner import log, run

MANIFEST = "grid.json"


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` -> [0, 1, 2]."""
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CLBenchError(
            f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise CLBenchError(f"--seeds {text!r}: expected distinct comma-separated integers")
    return seeds


def parse_methods(text: str | None) -> list[str]:
    methods = [m.strip() for m in (text or "").split(",") if m.strip()]
    if len(set(methods)) != len(methods):
        raise CLBenchError(f"--method {text!r} names a method twice")
    return methods


def run_name(method: str, seed: int) -> str:
    return f"{method}-seed{seed}"


def comparable(cfg: RunConfig) -> dict:
    """A config as a dict without its output folder (which may be spelled differently)."""
    data = to_dict(cfg)
    data.pop("out")
    return data


@dataclass
class Outcome:
    name: str
    status: str  # finished | skipped | failed
    error: str = ""
    seconds: float = 0.0


@dataclass
class Grid:
    """The runs of a grid folder: name -> resolved config."""

    out: Path
    configs: dict[str, RunConfig]

    @classmethod
    def create(cls, template: RunConfig, methods: list[str], seeds: list[int], out: Path) -> Grid:
        """Every method x seed of ``template`` (seeds outer: each seed's methods side by side)."""
        configs = {}
        for seed in seeds:
            for method in methods:
                cfg = copy.deepcopy(template)
                cfg.method, cfg.seed = method, seed
                cfg.out = str(out / run_name(method, seed))
                configs[run_name(method, seed)] = cfg
        return cls(out, configs)

    @classmethod
    def reopen(cls, out: Path) -> Grid:
        """The grid a folder's manifest describes (for ``--resume``)."""
        manifest = read_manifest(out)
        configs = {name: from_dict(entry["config"], f"{out / MANIFEST} run {name}")
                   for name, entry in manifest["runs"].items()}
        for name, cfg in configs.items():
            cfg.out = str(out / name)
        return cls(out, configs)

    def check(self) -> None:
        """Every method exists and takes the grid's method options, before anything runs."""
        for cfg in self.configs.values():
            get_method(cfg.method).options(cfg.method_options)


def read_manifest(out: Path) -> dict:
    file = out / MANIFEST
    if not file.exists():
        return {"runs": {}}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CLBenchError(f"{file}: not a grid manifest (invalid JSON: {err.msg})") from None


def write_manifest(out: Path, manifest: dict) -> None:
    """Written by rank 0 only, atomically."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(out / MANIFEST)


def stored_config_mismatch(folder: Path, cfg: RunConfig) -> str | None:
    """How the run already in ``folder`` differs from ``cfg`` (first differing key), if it does."""
    from cl_bench.running.run_folder import RunFolder

    stored = comparable(RunFolder(folder).read_config())
    wanted = comparable(cfg)
    for key in sorted(set(stored) | set(wanted)):
        if stored.get(key) != wanted.get(key):
            return f"{key}: {stored.get(key)!r} there, {wanted.get(key)!r} asked"
    return None


def run_one(cfg: RunConfig) -> str:
    """Run, resume or skip one grid run; returns what was done."""
    folder = Path(cfg.out)
    if (folder / "config.yaml").exists():
        mismatch = stored_config_mismatch(folder, cfg)
        if mismatch:
            raise CLBenchError(f"{folder} holds a run with another configuration ({mismatch}); "
                               "move it away or use another grid folder")
        if (folder / "summary.json").exists():
            return "skipped"
        run(cfg, resume=True)
        return "finished"
    run(cfg)
    return "finished"


def run_grid(grid: Grid) -> list[Outcome]:
    """Run every run of the grid in turn; failures are recorded and the grid goes on."""
    grid.check()
    manifest = read_manifest(grid.out)
    for name, cfg in grid.configs.items():
        entry = manifest["runs"].setdefault(name, {})
        entry |= {"method": cfg.method, "seed": cfg.seed, "config": comparable(cfg)}
        entry.setdefault("status", "pending")
    write_manifest(grid.out, manifest)
    outcomes = []
    for i, (name, cfg) in enumerate(grid.configs.items(), 1):
        folder = Path(cfg.out)
        state = ("finished, skipping" if (folder / "summary.json").exists() else
                 "resuming" if (folder / "config.yaml").exists() else "starting")
        log(f"grid run {i}/{len(grid.configs)}: {name} ({state})")
        started = time.time()
        entry = manifest["runs"][name]
        entry |= {"status": "running", "error": ""}
        write_manifest(grid.out, manifest)
        try:
            status, error = run_one(cfg), ""
        except Exception as err:  # a failed run is reported; the grid goes on
            traceback.print_exc()
            status, error = "failed", f"{type(err).__name__}: {err}"
            log(f"grid run {i}/{len(grid.configs)}: {name} FAILED: {error}")
        outcome = Outcome(name, status, error, round(time.time() - started, 1))
        outcomes.append(outcome)
        entry |= {"status": "finished" if status == "skipped" else status, "error": error}
        if status != "skipped":
            entry["seconds"] = outcome.seconds
        write_manifest(grid.out, manifest)
        release_memory()
    return outcomes


def release_memory() -> None:
    """Drop the finished run's model before the next one starts."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def outcome_table(grid: Grid, outcomes: list[Outcome]) -> str:
    lines = [f"grid {grid.out}: {len(outcomes)} run(s)"]
    for o in outcomes:
        detail = f" ({o.error})" if o.error else f" ({o.seconds:.0f} s)" if o.seconds else ""
        lines.append(f"  {o.name}: {o.status}{detail}")
    return "\n".join(lines)
