"""Experiment trackers (``--report-to tensorboard,wandb``): stage-level numbers and figures.

The Trainer's own integrations log the training curves of each stage; these trackers add what
only cl-bench knows, read from the run folder after each stage: every task's score, the mean
over the tasks learned so far, general benchmark and probe numbers, the accuracy matrix (as a
figure and a table), and at the end the summary metrics and the run's figures. Off unless asked;
rank 0 only. TensorBoard writes under ``<run>/tensorboard/``; Weights & Biases runs in the
mode its environment sets (``WANDB_MODE=offline`` writes under ``<run>/wandb/``; with
``WANDB_ERROR_REPORTING=false`` nothing reaches the network) and continues the same wandb run
when the cl-bench run is resumed.
"""

from __future__ import annotations

import os
from pathlib import Path

from cl_bench.errors import CLBenchError
from reports.results import PROBE_NUMBERS, Run

TRACKERS = ("tensorboard", "wandb")
INSTALL = {"tensorboard": "pip install 'cl-bench[tensorboard]'",
           "wandb": "pip install 'cl-bench[wandb]'"}


def check_trackers(names: list[str]) -> None:
    """Known names whose package imports, or a clear error before anything runs."""
    for name in names:
        if name not in TRACKERS:
            raise CLBenchError(f"--report-to {name!r}: expected one of {', '.join(TRACKERS)}")
        try:
            __import__(name)
        except ImportError:
            raise CLBenchError(f"--report-to {name}: {name} is not installed "
                               f"({INSTALL[name]})") from None


def stage_numbers(run: Run) -> tuple[int, dict[str, float]]:
    """The last completed stage and its numbers by name."""
    record = run.records[-1]
    stage, scores = record["stage"], record["scores"]
    learned = [t for r in run.records for t in r["trained_on"]]
    numbers = {f"score/{task}": value for task, value in scores.items()}
    numbers["score/mean_all_tasks"] = sum(scores.values()) / len(scores)
    if learned:
        numbers["score/mean_learned_tasks"] = sum(scores[t] for t in learned) / len(learned)
    for bench, metrics in record.get("general", {}).items():
        numbers |= {f"general/{bench}/{m}": v for m, v in metrics.items() if v is not None}
    probes = record.get("probes", {})
    numbers |= {f"probes/{k}": probes[k] for k in PROBE_NUMBERS if probes.get(k) is not None}
    if "train_loss" in record.get("train", {}):
        numbers["train/final_loss"] = record["train"]["train_loss"]
    return stage, {k: float(v) for k, v in numbers.items()}


def summary_numbers(run: Run) -> dict[str, float]:
    return {f"summary/{k}": float(v) for k, v in (run.summary or {}).items()
            if k in ("Avg", "Last", "MFT", "MAA", "BWT", "FWT", "Forgetting") and v is not None}


class TensorBoardTracker:
    def __init__(self, run_dir: Path, config: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))

    def log_stage(self, run: Run) -> None:
        from reports.figures import matrix_figure

        stage, numbers = stage_numbers(run)
        for name, value in numbers.items():
            self.writer.add_scalar(name, value, stage)
        self.writer.add_figure("accuracy_matrix", matrix_figure(run), stage)
        self.writer.flush()

    def finish(self, run: Run, figures: list[Path]) -> None:
        import matplotlib.image

        for name, value in summary_numbers(run).items():
            self.writer.add_scalar(name, value, len(run.records) - 1)
        for path in figures:
            image = matplotlib.image.imread(str(path))[..., :3]
            self.writer.add_image(f"figures/{path.stem}", image, dataformats="HWC")
        self.writer.close()


class WandbTracker:
    def __init__(self, run_dir: Path, config: dict) -> None:
        import wandb

        id_file = run_dir / "wandb_run_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        id_file.write_text(run_id)
        self.wandb = wandb
        self.run = wandb.init(dir=str(run_dir), project=os.environ.get("WANDB_PROJECT", "cl-bench"),
                              name=run_dir.name, id=run_id, resume="allow", config=config)
        wandb.define_metric("cl/stage")
        wandb.define_metric("cl/*", step_metric="cl/stage")

    def log_stage(self, run: Run) -> None:
        stage, numbers = stage_numbers(run)
        self.run.log({"cl/stage": stage, **{f"cl/{k}": v for k, v in numbers.items()}})

    def finish(self, run: Run, figures: list[Path]) -> None:
        matrix = run.matrix()
        table = self.wandb.Table(columns=["stage", *matrix.columns],
                                 data=[[s, *row] for s, row in zip(matrix.index,
                                                                   matrix.to_numpy().tolist(),
                                                                   strict=True)])
        self.run.log({"cl/accuracy_matrix": table,
                      **{f"cl/figures/{p.stem}": self.wandb.Image(str(p)) for p in figures}})
        self.run.summary.update(summary_numbers(run))
        self.run.finish()


class Trackers:
    """The trackers a run asked for (none: every call does nothing)."""

    def __init__(self, names: list[str], run_dir: Path, config: dict) -> None:
        self.run_dir = Path(run_dir)
        rank0 = int(os.environ.get("RANK", "0")) == 0
        kinds = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}
        self.trackers = [kinds[n](self.run_dir, config) for n in names] if rank0 else []

    def log_stage(self) -> None:
        if self.trackers:
            run = Run(self.run_dir)
            for tracker in self.trackers:
                tracker.log_stage(run)

    def finish(self) -> None:
        if self.trackers:
            run = Run(self.run_dir)
            figures = sorted((self.run_dir / "figures").glob("*.png"))
            for tracker in self.trackers:
                tracker.finish(run, figures)
