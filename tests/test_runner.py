"""End to end through the CLI on the tiny fixtures: run folder, resume, determinism, bad input."""

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from run_kit import LEARNING, assert_same_run, kill_after_predictions, stage_answers

from cl_bench.cli import main
from cl_bench.errors import CLBenchError


def quick_argv(ucit_root: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--method", "finetune", "--suite", "ucit", "--data-root", str(ucit_root),
            "--model", str(model), "--quick", "--order", "RV", "--out", str(out),
            "--set", "eval.max_new_tokens=4", *LEARNING, *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, ucit_root: Path, taught_llava: Path) -> Path:
    out = tmp_path_factory.mktemp("runs") / "full"
    assert main(quick_argv(ucit_root, taught_llava, out)) == 0
    return out


def test_run_folder_contract(finished: Path) -> None:
    for name in ("config.yaml", "matrix.csv", "records.jsonl", "summary.json", "report.md"):
        assert (finished / name).exists(), name
    summary = json.loads((finished / "summary.json").read_text())
    assert {"Avg", "Last", "MFT", "MAA", "BWT", "FWT"} <= set(summary)
    assert summary["quick"] is True and summary["order"] == ["ImageNet-R", "VizWiz-caption"]
    assert (finished / "matrix.csv").read_text().splitlines()[0] == (
        "stage,trained_on,ImageNet-R,VizWiz-caption"
    )
    rows = [json.loads(x) for x in (finished / "predictions/stage_2/VizWiz-caption.jsonl")
            .read_text().splitlines()]
    assert rows and all(r["references"] and "prediction" in r for r in rows)
    record = json.loads((finished / "records.jsonl").read_text().splitlines()[-1])
    assert set(record["details"]["VizWiz-caption"]) >= {"Bleu_4", "METEOR", "CIDEr"}
    assert "config.yaml" not in (finished / "report.md").read_text()
    assert not (finished / "checkpoints" / "stage_1").exists()
    assert (finished / "checkpoints" / "stage_2").exists()


def test_the_stages_change_the_answers(finished: Path) -> None:
    """What the resume tests compare carries signal: scores above zero that stage 1 moves, and
    answers that each stage changes from the stage before (a resume that skipped a stage's
    training would repeat them). Stage 2 may bring back stage 0's answers: the taught model knew
    its captions already."""
    rows = [line.split(",")[2:] for line in (finished / "matrix.csv").read_text().splitlines()[1:]]
    assert all(float(score) > 10 for score in rows[0])
    assert rows[1] != rows[0]
    answers = [stage_answers(finished, stage) for stage in (0, 1, 2)]
    assert {t for t, _ in answers[0]} == {t for t, _ in answers[2]} == {"ImageNet-R",
                                                                      "VizWiz-caption"}
    assert answers[1] != answers[0] and answers[2] != answers[1]


@pytest.mark.parametrize(("files", "stage"), [(3, 1), (5, 2)])
def test_resume_after_a_kill_mid_stage_gives_the_same_run(
    files: int, stage: int, finished: Path, ucit_root: Path, taught_llava: Path, tmp_path: Path,
    monkeypatch
) -> None:
    """Killed while evaluating stage 1 or 2 (two predictions files per stage): the resumed run
    writes every answer, score and record the uninterrupted run wrote."""
    out = tmp_path / "killed"
    kill_after_predictions(monkeypatch, files)
    with pytest.raises(KeyboardInterrupt):
        main(quick_argv(ucit_root, taught_llava, out))
    assert len((out / "records.jsonl").read_text().splitlines()) == stage
    assert (out / "predictions" / f"stage_{stage}" / "ImageNet-R.jsonl").is_file()
    monkeypatch.undo()
    assert main(["run", "--out", str(out), "--resume"]) == 0
    assert_same_run(out, finished)


def test_resuming_a_finished_run_changes_nothing(finished: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    assert main(["run", "--out", str(copy), "--resume"]) == 0
    assert_same_run(copy, finished, "checkpoints")
    summary, again = (json.loads((run / "summary.json").read_text()) for run in (finished, copy))
    assert {**summary, "wall_seconds_last_session": 0} == {**again, "wall_seconds_last_session": 0}


def test_bad_input_is_one_clear_line(
    finished: Path, ucit_root: Path, taught_llava: Path, tmp_path: Path, capsys
) -> None:
    before = (finished / "records.jsonl").read_text()
    cases = [
        (["run", "--suite", "ucit-mikro"], "Did you mean 'ucit-micro'"),
        (["run", "--method", "fintune"], "Did you mean 'finetune'"),
        (["run", "--set", "train.lr=1"], "unknown config key 'train.lr'"),
        (["run", "--set", "method.alpha=0.3", "--method", "finetune"], "method.alpha"),
        (quick_argv(ucit_root, taught_llava, finished), "already holds a run"),
        (["run", "--resume"], "--resume needs --out"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert (finished / "records.jsonl").read_text() == before
    assert not Path("runs").exists() or not any(Path("runs").glob("ucit-mikro*"))


def half_writing_open(real_open):
    """``open`` whose files, opened to write, die (KeyboardInterrupt) halfway through a write:
    a process killed while it writes."""

    class Dying:
        def __init__(self, file) -> None:
            self.file = file

        def write(self, text: str) -> int:
            self.file.write(text[: len(text) // 2])
            self.file.flush()
            raise KeyboardInterrupt("killed while writing")

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.file.close()

    def dying_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return Dying(handle) if any(m in mode for m in "wa") else handle

    return dying_open


def test_a_run_killed_while_it_writes_a_record_resumes_to_the_same_matrix(
    finished: Path, ucit_root: Path, taught_llava: Path, tmp_path: Path, monkeypatch
) -> None:
    import builtins

    from cl_bench.running.run_folder import RunFolder

    real_append, real_open = RunFolder.append_record, builtins.open

    def dies_at_stage_2(folder, record):
        if record["stage"] == 2:
            monkeypatch.setattr(builtins, "open", half_writing_open(real_open))
        try:
            real_append(folder, record)
        finally:
            monkeypatch.setattr(builtins, "open", real_open)

    out = tmp_path / "killed"
    monkeypatch.setattr(RunFolder, "append_record", dies_at_stage_2)
    with pytest.raises(KeyboardInterrupt):
        main(quick_argv(ucit_root, taught_llava, out))
    text = (out / "records.jsonl").read_text()
    assert text.endswith("\n") and [json.loads(x)["stage"] for x in text.splitlines()] == [0, 1]
    monkeypatch.setattr(RunFolder, "append_record", real_append)
    assert main(["run", "--out", str(out), "--resume"]) == 0
    assert (out / "matrix.csv").read_text() == (finished / "matrix.csv").read_text()


def test_the_environment_is_in_the_config_every_record_and_the_report(finished: Path) -> None:
    import yaml

    env = yaml.safe_load((finished / "config.yaml").read_text())["environment"]
    assert env["packages"]["torch"] and env["packages"]["transformers"]
    assert {"peft", "lmms_eval", "deepspeed"} <= set(env["packages"])
    assert (env["device"], env["dtype"], env["world_size"]) == ("cpu", "float32", 1)
    assert len(env["base_model_fingerprint"]) == 16 and "git_commit" in env
    for record in (json.loads(x) for x in (finished / "records.jsonl").read_text().splitlines()):
        assert record["environment"] == env
    report = (finished / "report.md").read_text()
    assert "## Environment" in report and env["base_model_fingerprint"] in report


def test_resume_refuses_a_changed_config_or_code_unless_forced(
    finished: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    import shutil

    import cl_bench.running.environment

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = (run / "records.jsonl").read_text()
    assert main(["run", "--out", str(run), "--resume", "--set", "train.learning_rate=1"]) == 2
    assert "started under another config" in capsys.readouterr().err
    config = run / "config.yaml"
    original = config.read_text()
    assert "max_steps: 12" in original
    config.write_text(original.replace("max_steps: 12", "max_steps: 13"))
    assert main(["run", "--out", str(run), "--resume"]) == 2
    assert "config.yaml edited, or --set given" in capsys.readouterr().err
    config.write_text(original)
    monkeypatch.setattr(cl_bench.running.environment, "git_commit", lambda: "0" * 40)
    assert main(["run", "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "started under another code version" in err and "--force" in err
    assert (run / "records.jsonl").read_text() == before
    assert main(["run", "--out", str(run), "--resume", "--force"]) == 0
    assert "0" * 40 in config.read_text()
    # a folder of an older cl-bench records no environment: nothing to compare, said so
    monkeypatch.setattr(cl_bench.running.environment, "git_commit", lambda: "1" * 40)
    settings = yaml.safe_load(config.read_text())
    del settings["environment"]
    config.write_text(yaml.safe_dump(settings))
    capsys.readouterr()
    assert main(["run", "--out", str(run), "--resume"]) == 0
    said = capsys.readouterr()
    assert "records no environment (an older run): not compared" in said.out + said.err
    assert (run / "records.jsonl").read_text() == before


def test_two_runs_cannot_write_one_folder(finished: Path, tmp_path: Path, capsys) -> None:
    from cl_bench.running.run_folder import RunLock

    lock = RunLock(finished).acquire()
    try:
        assert main(["run", "--out", str(finished), "--resume"]) == 2
        err = capsys.readouterr().err
        assert f"in use by another run (pid {os.getpid()}" in err
        with pytest.raises(CLBenchError, match="in use by another run"):
            RunLock(finished).acquire()
    finally:
        lock.release()
    RunLock(finished).acquire().release()


def test_every_record_holds_the_stage_footprint(finished: Path, taught_llava: Path) -> None:
    """Stage 0 holds the starting model's own tensors and keeps nothing; each stage trains the
    same LoRA + projector and keeps exactly its checkpoint's weight files."""
    from cl_bench.models.llava import load_llava

    records = [json.loads(x) for x in (finished / "records.jsonl").read_text().splitlines()]
    base = load_llava(taught_llava).model
    tensors = {id(t): t for t in [*base.parameters(), *base.buffers()]}.values()
    start, *stages = [r["footprint"] for r in records]
    assert start == {"trainable_parameters": 0, "kept_bytes": 0,
                     "inference_parameters": sum(t.numel() for t in tensors),
                     "inference_bytes": sum(t.numel() * t.element_size() for t in tensors)}
    projector = sum(p.numel() for p in base.model.multi_modal_projector.parameters())
    assert stages[0]["trainable_parameters"] == stages[1]["trainable_parameters"] > projector
    kept = sum(f.stat().st_size for f in (finished / "checkpoints/stage_2").rglob("*.safetensors"))
    assert stages[1]["kept_bytes"] == kept
    assert stages[1]["kept_bytes"] > stages[0]["kept_bytes"] > 0  # the stages' updates, kept
