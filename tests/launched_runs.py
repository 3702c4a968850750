"""Run ``clbench`` command lines one after another in each process of a torchrun launch (tests).

``python -m torch.distributed.run --nproc_per_node 2 tests/launched_runs.py PLAN.json``, where
PLAN.json holds ``{"runs": [argv, ...], "kill": {"run": i, "stage": t, "rank": r} | null}``:
rank r of run i kills itself (SIGKILL, as an out-of-memory killer would) when stage t starts
training. Exits with the first failing run's status.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cl_bench.running.environment as environment  # noqa: E402
import cl_bench.running.runner as runner  # noqa: E402
from cl_bench.cli import main  # noqa: E402
from cl_bench.running.distributed import rank  # noqa: E402


def killing(kill: dict):
    """``train_model`` that kills this process at the start of stage ``kill["stage"]``."""
    real = runner.train_model

    def train_model(model, bundle, samples, cfg, output_dir, *args, **kwargs):
        if rank() == kill["rank"] and Path(output_dir).name == f"stage_{kill['stage']}":
            os.kill(os.getpid(), signal.SIGKILL)
        return real(model, bundle, samples, cfg, output_dir, *args, **kwargs)

    return train_model


if __name__ == "__main__":
    environment.git_commit = lambda: "test-checkout"  # as tests/conftest.py pins it
    plan = json.loads(Path(sys.argv[1]).read_text())
    real_train = runner.train_model
    for index, argv in enumerate(plan["runs"]):
        kill = plan.get("kill")
        runner.train_model = killing(kill) if kill and kill["run"] == index else real_train
        status = main(argv)
        if status:
            sys.exit(status)
