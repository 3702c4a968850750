"""Grids, the leaderboard, the figures and the results API on run folders of real quick runs.

One module-scoped grid (finetune, llava_c_sac and zeroshot x seeds 0 and 1 on the tiny fixtures)
is run twice: the first pass kills finetune seed 1 at its second stage, the second pass must skip
the finished runs and resume the killed one.
"""

from __future__ import annotations

import base64
import io
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch

import cl_bench.running.grid
import cl_bench.running.runner
from cl_bench.cli import main
from cl_bench.models.deltas import StageDelta
from methods.llava_c.consolidation import sac_delta
from reports import results
from reports.leaderboard import Cell, Row, Table, build_tables, lower_is_better
from reports.publish import leaderboard

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METHODS = ("finetune", "llava_c_sac", "zeroshot")


def grid_argv(ucit_root: Path, tiny_llava: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--method", ",".join(METHODS), "--seeds", "0,1", "--suite", "ucit",
            "--data-root", str(ucit_root), "--model", str(tiny_llava), "--quick", "--order", "RV",
            "--out", str(out), "--set", "eval.max_new_tokens=4",
            "--set", "train.learning_rate=0.05", *extra]


@dataclass
class GridRuns:
    grid: Path
    first_exit: int
    manifest_after_crash: dict
    unfinished: Path  # a copy of the killed run as the crash left it
    files_before: dict[str, bytes]  # records.jsonl and summary.json of every run after pass 1
    second_pass_calls: list[tuple[str, int, bool]]  # (method, seed, resume) run() was given
    other_order: Path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ucit_root: Path, tiny_llava: Path) -> GridRuns:
    tmp = tmp_path_factory.mktemp("reports")
    grid = tmp / "grid"
    real_stage, real_run = cl_bench.running.runner.run_stage, cl_bench.running.grid.run

    def killed_at_stage_2(method, model, stage, *args, **kwargs):
        cfg = method.context.config
        if cfg.method == "finetune" and cfg.seed == 1 and stage.index == 2:
            raise RuntimeError("killed at stage 2")
        return real_stage(method, model, stage, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cl_bench.running.runner, "run_stage", killed_at_stage_2)
        first_exit = main(grid_argv(ucit_root, tiny_llava, grid))
    manifest = json.loads((grid / "grid.json").read_text())
    unfinished = tmp / "unfinished" / "finetune-seed1"
    shutil.copytree(grid / "finetune-seed1", unfinished)
    files_before = {
        str(f.relative_to(grid)): f.read_bytes()
        for name in ("records.jsonl", "summary.json") for f in grid.glob(f"*/{name}")
    }
    calls: list[tuple[str, int, bool]] = []

    def spy(cfg, resume=False):
        calls.append((cfg.method, cfg.seed, resume))
        return real_run(cfg, resume=resume)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cl_bench.running.grid, "run", spy)
        assert main(grid_argv(ucit_root, tiny_llava, grid)) == 0
    other = tmp / "other-order"
    argv = ["run", "--method", "finetune", "--suite", "ucit", "--data-root", str(ucit_root),
            "--model", str(tiny_llava), "--quick", "--order", "VR", "--out", str(other),
            "--set", "eval.max_new_tokens=4", "--set", "train.learning_rate=0.05"]
    assert main(argv) == 0
    return GridRuns(grid, first_exit, manifest, unfinished, files_before, calls, other)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_a_failed_run_is_reported_and_the_grid_goes_on(runs: GridRuns) -> None:
    assert runs.first_exit == 2
    statuses = {n: e["status"] for n, e in runs.manifest_after_crash["runs"].items()}
    assert statuses == {f"{m}-seed{s}": "finished" for s in (0, 1) for m in METHODS} | {
        "finetune-seed1": "failed"}
    assert "killed at stage 2" in runs.manifest_after_crash["runs"]["finetune-seed1"]["error"]


def test_grid_skips_finished_runs_and_resumes_the_interrupted_one(runs: GridRuns) -> None:
    assert runs.second_pass_calls == [("finetune", 1, True)]
    for name, content in runs.files_before.items():
        if not name.startswith("finetune-seed1/"):
            assert (runs.grid / name).read_bytes() == content, f"{name} was rewritten"
    before = runs.files_before["finetune-seed1/records.jsonl"].decode().splitlines()
    after = (runs.grid / "finetune-seed1" / "records.jsonl").read_text().splitlines()
    assert len(before) == 2 and after[:2] == before and len(after) == 3  # resumed, not restarted
    manifest = json.loads((runs.grid / "grid.json").read_text())
    assert {e["status"] for e in manifest["runs"].values()} == {"finished"}


def test_resume_of_a_grid_folder_reruns_its_manifest(runs: GridRuns, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(cl_bench.running.grid, "run", lambda cfg, resume=False: calls.append(cfg))
    assert main(["run", "--out", str(runs.grid), "--resume"]) == 0
    assert calls == []  # every run of the manifest is finished: all skipped
    (runs.grid / "zeroshot-seed1" / "summary.json").rename(runs.grid / "summary.moved")
    try:
        assert main(["run", "--out", str(runs.grid), "--resume"]) == 0
    finally:
        (runs.grid / "summary.moved").rename(runs.grid / "zeroshot-seed1" / "summary.json")
    assert [(c.method, c.seed, c.out) for c in calls] == [
        ("zeroshot", 1, str(runs.grid / "zeroshot-seed1"))]


def test_grid_refuses_a_folder_holding_another_configuration(
    runs: GridRuns, ucit_root: Path, tiny_llava: Path, tmp_path: Path
) -> None:
    grid = tmp_path / "grid"
    shutil.copytree(runs.grid / "zeroshot-seed0", grid / "zeroshot-seed0")
    argv = ["run", "--method", "zeroshot", "--seeds", "0", "--suite", "ucit", "--data-root",
            str(ucit_root), "--model", str(tiny_llava), "--quick", "--order", "RV",
            "--out", str(grid), "--set", "eval.max_new_tokens=5"]
    assert main(argv) == 2
    error = json.loads((grid / "grid.json").read_text())["runs"]["zeroshot-seed0"]["error"]
    assert "another configuration" in error and "max_new_tokens" in error


def row(table: Table, label: str) -> Row:
    return next(r for r in table.rows if r.label == label)


def test_leaderboard_means_and_sample_stds_equal_a_hand_computation(runs: GridRuns) -> None:
    [table] = build_tables([runs.grid])
    assert [r.label for r in table.rows] == ["finetune", "llava_c_sac",
                                             "zeroshot [bound: zero-shot]"]
    spread = 0.0
    for method in ("finetune", "llava_c_sac"):
        seeds = [summary(runs.grid / f"{method}-seed{s}") for s in (0, 1)]
        for metric in ("Avg", "Last", "MFT", "MAA", "BWT", "FWT", "Forgetting"):
            a, b = seeds[0][metric], seeds[1][metric]
            cell = row(table, method).cells[metric]
            assert cell.n == 2
            assert cell.mean == pytest.approx((a + b) / 2)
            assert cell.std == pytest.approx(abs(a - b) / math.sqrt(2))  # ddof = 1 for n = 2
            spread = max(spread, abs(a - b))
    assert spread > 0.1, "the seeds must differ for the std check to mean anything"
    cell = row(table, "finetune").cells["Last"]
    markdown = leaderboard([runs.grid])
    assert f"{cell.mean:.2f} ± {cell.std:.2f}" in markdown
    frame = pd.read_csv(io.StringIO(leaderboard([runs.grid], "csv")))
    line = frame[frame["row"] == "finetune"].iloc[0]
    assert line["Last mean"] == pytest.approx(cell.mean) and line["Last n"] == 2


def test_leaderboard_flags_mismatched_runs(runs: GridRuns, tmp_path: Path) -> None:
    changed = tmp_path / "changed-lr"
    shutil.copytree(runs.grid / "finetune-seed0", changed)
    config = (changed / "config.yaml").read_text()
    (changed / "config.yaml").write_text(config.replace("learning_rate: 0.05",
                                                        "learning_rate: 0.001"))
    twin = tmp_path / "twin"
    shutil.copytree(runs.grid / "llava_c_sac-seed0", twin)
    half = tmp_path / "alpha-half"
    shutil.copytree(runs.grid / "llava_c_sac-seed0", half)
    config = (half / "config.yaml").read_text()
    assert "method_options: {}" in config
    (half / "config.yaml").write_text(config.replace("method_options: {}",
                                                     "method_options:\n  alpha: 0.5"))
    tables = build_tables([runs.unfinished, runs.grid, runs.other_order, changed, twin, half])
    assert len(tables) == 2  # the other task order is a table of its own
    assert all("order" in t.title and "quick runs" in t.title for t in tables)
    main_table = next(t for t in tables if t.setting["order"] == ["ImageNet-R",
                                                                   "VizWiz-caption"])
    labels = [r.label for r in main_table.rows]
    assert "finetune (train.learning_rate=0.05)" in labels
    assert "finetune (train.learning_rate=0.001)" in labels
    finetune = row(main_table, "finetune (train.learning_rate=0.05)")
    assert [r.path for r in finetune.runs] == [runs.grid / "finetune-seed0",
                                               runs.grid / "finetune-seed1"]
    # a method option set in one run: the others' is the variant's default
    sac = row(main_table, "llava_c_sac (train.learning_rate=0.05, method.alpha=default)")
    assert len(sac.runs) == 2
    assert row(main_table, "llava_c_sac (train.learning_rate=0.05, method.alpha=0.5)").runs[
        0].path == half
    notes = "\n".join(main_table.notes)
    assert f"unfinished, not averaged: {runs.unfinished}" in notes
    assert "seed 0 appears twice" in notes and "seed 1 appears twice" not in notes


def test_memory_columns_come_from_the_records_footprints(runs: GridRuns) -> None:
    [table] = build_tables([runs.grid])
    for method in ("finetune", "llava_c_sac"):
        records = [json.loads(x) for x in
                   (runs.grid / f"{method}-seed0" / "records.jsonl").read_text().splitlines()]
        prints = [r["footprint"] for r in records]
        cells = row(table, method).cells
        assert cells["Kept (MB)"].values[0] == prints[-1]["kept_bytes"] / 1e6
        assert cells["Trained (M)"].values[0] == max(
            p["trainable_parameters"] for p in prints) / 1e6
        assert cells["Added at inference (M)"].values[0] == (
            prints[-1]["inference_parameters"] - prints[0]["inference_parameters"]) / 1e6
        assert cells["Kept (MB)"].mean > 0
    bound = row(table, "zeroshot [bound: zero-shot]").cells  # never trained: nothing kept
    assert "Kept (MB)" not in bound or not bound["Kept (MB)"].values
    assert lower_is_better("Kept (MB)") and lower_is_better("Trained (M)")


def test_best_is_direction_aware_and_skips_bounds() -> None:
    def make(label: str, kind: str, forgetting: float, bwt: float) -> Row:
        return Row(label, label, kind, [], {"Forgetting": Cell([forgetting]),
                                            "BWT": Cell([bwt])})

    rows = [make("a", "continual", 5.0, -5.0), make("b", "continual", 2.0, -9.0),
            make("upper", "joint", 0.0, 0.0)]
    table = Table("t", {}, ["Forgetting", "BWT"], rows)
    assert table.best("Forgetting") == 2.0 and table.best("BWT") == -5.0
    assert table.is_best(rows[1], "Forgetting") and table.is_best(rows[0], "BWT")
    assert not table.is_best(rows[2], "Forgetting")


def test_leaderboard_formats_and_per_task(runs: GridRuns, tmp_path: Path) -> None:
    latex = tmp_path / "board.tex"
    assert main(["leaderboard", str(runs.grid), "--format", "latex", "--out", str(latex)]) == 0
    text = latex.read_text()
    for part in ("\\toprule", "\\midrule", "\\bottomrule", "llava\\_c\\_sac", "$\\pm$",
                 "Forgetting $\\downarrow$"):
        assert part in text
    assert "\\textbf{" in text
    page = leaderboard([runs.grid], "html", figures_dir=tmp_path / "figures")
    assert "http://" not in page and "https://" not in page
    images = page.split('src="data:image/png;base64,')[1:]
    assert images and base64.b64decode(images[0].split('"')[0]).startswith(PNG_MAGIC)
    for name in ("table1-matrices.png", "table1-matrices.pdf", "table1-footprint.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 1000
    [table] = build_tables([runs.grid], per_task=True)
    assert table.columns == ["ImageNet-R", "VizWiz-caption", "Last"]
    final = summary(runs.grid / "finetune-seed1")["final"]["VizWiz-caption"]
    assert final in row(table, "finetune").cells["VizWiz-caption"].values


def test_every_run_figure_is_written_and_embedded(runs: GridRuns) -> None:
    run = runs.grid / "llava_c_sac-seed1"
    for name in ("matrix", "tasks", "spectra"):
        for suffix in (".png", ".pdf"):
            assert (run / "figures" / f"{name}{suffix}").stat().st_size > 1000, name
        assert (run / "figures" / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
        assert f"](figures/{name}.png)" in (run / "report.md").read_text()
    assert not (runs.grid / "finetune-seed0" / "figures" / "spectra.png").exists()


def test_spectra_equal_the_full_svd_of_the_stored_update(runs: GridRuns) -> None:
    run = runs.grid / "llava_c_sac-seed0"
    data = json.loads((run / "spectra" / "stage_2.json").read_text())
    assert data["consolidation"] == "sac" and data["alpha"] == 0.2
    delta = StageDelta.load(run / "deltas" / "stage_2.safetensors")
    assert set(data["matrices"]) == set(delta.lora)
    for name in list(delta.lora)[:3]:
        full = delta.lora[name].product().double()
        spectrum = data["matrices"][name]
        p = len(spectrum["before"])
        assert p == delta.lora[name].A.shape[0]
        expected_before = torch.linalg.svdvals(full)[:p]
        expected_after = torch.linalg.svdvals(sac_delta(full, 0.2))[:p]
        assert torch.allclose(torch.tensor(spectrum["before"]).double(), expected_before,
                              atol=1e-5)
        assert torch.allclose(torch.tensor(spectrum["after"]).double(), expected_after,
                              atol=1e-5)


def test_results_frames(runs: GridRuns) -> None:
    frame = results.runs_frame([runs.grid, runs.unfinished])
    assert len(frame) == 7
    assert set(frame.loc[frame["run"] == str(runs.unfinished), "status"]) == {"unfinished"}
    assert set(frame.loc[frame["method"] == "zeroshot", "kind"]) == {"zero-shot"}
    run = runs.grid / "finetune-seed1"
    matrix = results.matrix_frame([run]).pivot(index="stage", columns="task", values="score")
    stored = pd.read_csv(run / "matrix.csv", index_col="stage").drop(columns="trained_on")
    assert (matrix[stored.columns] - stored).abs().max().max() < 0.006  # matrix.csv: 2 decimals
    predictions = results.predictions_frame([run], stage=2, task="VizWiz-caption")
    lines = (run / "predictions" / "stage_2" / "VizWiz-caption.jsonl").read_text().splitlines()
    assert len(predictions) == len(lines) and predictions["references"].map(len).min() > 0
    records = results.records_frame([run])
    assert list(records["stage"]) == [0, 1, 2] and records["train_loss"].notna().sum() == 2
    spectra = results.spectra_frame([runs.grid / "llava_c_sac-seed0"])
    assert set(spectra["stage"]) == {1, 2} and (spectra["after"] < spectra["before"]).any()


def test_report_to_tensorboard_and_offline_wandb(
    ucit_root: Path, tiny_llava: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")  # never a network call:
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")  # no error reports either
    monkeypatch.setenv("WANDB_SILENT", "true")
    pytest.importorskip("tensorboard")
    wandb = pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tracked"
    argv = ["run", "--method", "finetune", "--suite", "ucit", "--data-root", str(ucit_root),
            "--model", str(tiny_llava), "--quick", "--order", "RV", "--out", str(out),
            "--set", "eval.max_new_tokens=4", "--report-to", "tensorboard,wandb"]
    assert main(argv) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    matrix = pd.read_csv(out / "matrix.csv", index_col="stage")
    logged = [(e.step, e.value) for e in events.Scalars("score/VizWiz-caption")]
    assert [s for s, _ in logged] == [0, 1, 2]
    assert [round(v, 2) for _, v in logged] == list(matrix["VizWiz-caption"])
    last = events.Scalars("summary/Last")[0].value
    assert last == pytest.approx(summary(out)["Last"], abs=1e-4)
    assert {"accuracy_matrix", "figures/matrix", "figures/tasks"} <= set(events.Tags()["images"])
    trainer = EventAccumulator(str(next((out / "trainer" / "stage_1" / "runs").iterdir())))
    trainer.Reload()
    assert "train/train_loss" in trainer.Tags()["scalars"]  # the Trainer's own integration
    [offline] = (out / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"cl/score/ImageNet-R" in offline.read_bytes()
    assert wandb.run is None  # finished, nothing left open
    capsys.readouterr()
    assert main(["run", "--out", str(tmp_path / "x"), "--report-to", "mlflow"]) == 2
    assert "--report-to 'mlflow': expected one of tensorboard, wandb" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_stage_spectra_for_each_consolidation_and_half_precision_factors() -> None:
    from cl_bench.models.deltas import LoraFactors
    from methods.llava_c.spectra import stage_spectra

    gen = torch.Generator().manual_seed(0)
    factors = LoraFactors(torch.randn(10, 3, generator=gen).bfloat16(),
                          torch.randn(3, 7, generator=gen).bfloat16(), 2.0)
    delta = StageDelta(lora={"layer.q_proj": factors})
    expected = torch.linalg.svdvals(factors.product().double())[:3]
    for kind, scale in (("none", 1.0), ("modelmix", 0.3)):
        [spectrum] = stage_spectra(delta, kind, 0.3, "pad").values()
        assert spectrum["shape"] == [10, 7]
        assert torch.allclose(torch.tensor(spectrum["before"]).double(), expected, rtol=1e-5)
        assert torch.allclose(torch.tensor(spectrum["after"]).double(), scale * expected,
                              rtol=1e-5)
    [sac] = stage_spectra(delta, "sac", 0.3, "pad").values()
    full = sac_delta(factors.product().double(), 0.3)
    assert torch.allclose(torch.tensor(sac["after"]).double(), torch.linalg.svdvals(full)[:3],
                          rtol=1e-5)


@pytest.mark.parametrize("panels", [5, 2])
def test_the_legend_of_many_methods_hides_no_panel(panels: int) -> None:
    from reports.figures import place_legend
    from reports.style import pyplot

    plt = pyplot()
    columns = min(panels, 3)
    fig, axes = plt.subplots(-(-panels // columns), columns, squeeze=False,
                             layout="constrained")
    axes = list(axes.flat)
    for ax in axes[:panels]:
        for i in range(23):
            ax.plot([0, 1, 2], [i, i + 1, i], label=f"method {i}")
    place_legend(fig, axes, panels)
    fig.canvas.draw()
    legend = axes[panels].get_legend() if panels < len(axes) else fig.legends[0]
    assert len(legend.get_texts()) == 23 and all(ax.get_legend() is None for ax in axes[:panels])
    box = legend.get_window_extent()
    assert not any(box.overlaps(ax.get_window_extent()) for ax in axes[:panels])
    plt.close(fig)
