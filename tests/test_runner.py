"""End to end through the CLI on the tiny fixtures: run folder, resume, determinism, bad input."""

import json
from pathlib import Path

import pytest

import cl_bench.running.runner
from cl_bench.cli import main


def quick_argv(ucit_root: Path, tiny_llava: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--method", "finetune", "--suite", "ucit", "--data-root", str(ucit_root),
            "--model", str(tiny_llava), "--quick", "--order", "RV", "--out", str(out),
            "--set", "eval.max_new_tokens=4", *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, ucit_root: Path, tiny_llava: Path) -> Path:
    out = tmp_path_factory.mktemp("runs") / "full"
    assert main(quick_argv(ucit_root, tiny_llava, out)) == 0
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


def test_resume_after_a_crash_gives_the_same_numbers(
    finished: Path, ucit_root: Path, tiny_llava: Path, tmp_path: Path, monkeypatch
) -> None:
    real_stage = cl_bench.running.runner.run_stage

    def crash_at_stage_2(method, model, stage, *args, **kwargs):
        if stage.index == 2:
            raise KeyboardInterrupt("killed")
        return real_stage(method, model, stage, *args, **kwargs)

    out = tmp_path / "crashed"
    monkeypatch.setattr(cl_bench.running.runner, "run_stage", crash_at_stage_2)
    with pytest.raises(KeyboardInterrupt):
        main(quick_argv(ucit_root, tiny_llava, out))
    assert len((out / "records.jsonl").read_text().splitlines()) == 2
    monkeypatch.setattr(cl_bench.running.runner, "run_stage", real_stage)
    assert main(["run", "--out", str(out), "--resume"]) == 0
    assert (out / "matrix.csv").read_text() == (finished / "matrix.csv").read_text()


def test_bad_input_is_one_clear_line(
    finished: Path, ucit_root: Path, tiny_llava: Path, tmp_path: Path, capsys
) -> None:
    before = (finished / "records.jsonl").read_text()
    cases = [
        (["run", "--suite", "ucit-mikro"], "Did you mean 'ucit-micro'"),
        (["run", "--method", "fintune"], "Did you mean 'finetune'"),
        (["run", "--set", "train.lr=1"], "unknown config key 'train.lr'"),
        (["run", "--set", "method.alpha=0.3", "--method", "finetune"], "method.alpha"),
        (quick_argv(ucit_root, tiny_llava, finished), "already holds a run"),
        (["run", "--resume"], "--resume needs --out"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert (finished / "records.jsonl").read_text() == before
    assert not Path("runs").exists() or not any(Path("runs").glob("ucit-mikro*"))
