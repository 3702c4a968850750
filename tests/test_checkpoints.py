"""Checkpoints that scale: what changed plus a pointer to the starting model, written before the
evaluation, and resumable mid-stage from Trainer checkpoints with the same numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

import cl_bench.running.runner
from cl_bench.cli import main
from cl_bench.errors import CLBenchError
from cl_bench.models.checkpoint import BASE_FILE, MODEL_FILE, fingerprint
from cl_bench.running.training import METHOD_STATE_FILE, TRAINABLE_FILE, MethodTrainer


def argv(method: str, ucit_root: Path, tiny_llava: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--method", method, "--suite", "ucit", "--data-root", str(ucit_root),
            "--model", str(tiny_llava), "--quick", "--order", "RA", "--out", str(out),
            "--general", "none", "--set", "eval.max_new_tokens=4", "--set", "lora.rank=4",
            "--set", "train.global_batch_size=8", *extra]


@pytest.fixture(scope="module")
def inquiries(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inquiries") / "inquiries.json"
    questions = ["What colour is the square?", "Describe the image.", "Name a shape."]
    path.write_text(json.dumps([{"id": i, "text": q} for i, q in enumerate(questions * 3)]))
    return path


@pytest.fixture(scope="module")
def llava_c_args(inquiries) -> list[str]:
    return ["--set", f"method.inquiry_file={inquiries}", "--set", "train.save_steps=2",
            "--set", "train.learning_rate=0.02"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, ucit_root, tiny_llava, llava_c_args) -> Path:
    out = tmp_path_factory.mktemp("runs") / "whole"
    assert main(argv("llava_c", ucit_root, tiny_llava, out, *llava_c_args)) == 0
    return out


def test_a_checkpoint_holds_what_changed_and_points_to_the_base(uninterrupted, tiny_llava):
    checkpoint = uninterrupted / "checkpoints" / "stage_2"
    pointer = json.loads((checkpoint / BASE_FILE).read_text())
    assert pointer == {"path": str(tiny_llava.resolve()), "fingerprint": fingerprint(tiny_llava)}
    with safe_open(str(checkpoint / MODEL_FILE), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith(("update::", "param::model.multi_modal_projector."))
                        for k in keys)
    weights = sum(p.stat().st_size for p in tiny_llava.glob("*.safetensors"))
    assert (checkpoint / MODEL_FILE).stat().st_size < weights / 2
    trainer = uninterrupted / "trainer"
    assert not trainer.exists() or not any(trainer.iterdir())  # removed once stages are kept


def test_a_run_killed_mid_stage_ends_with_the_same_matrix(
    uninterrupted, ucit_root, tiny_llava, llava_c_args, tmp_path, monkeypatch
) -> None:
    real_step = MethodTrainer.training_step
    seen: dict[str, object] = {}

    def killed_at_step_3_of_stage_2(self, model, inputs, num_items_in_batch=None):
        folder = Path(self.args.output_dir)
        if folder.name == "stage_2" and self.state.global_step == 3:
            seen["checkpoints"] = sorted(p.name for p in folder.glob("checkpoint-*"))
            seen["files"] = sorted(p.name for p in (folder / "checkpoint-2").iterdir())
            seen["state"] = json.loads((folder / "checkpoint-2" / METHOD_STATE_FILE).read_text())
            raise KeyboardInterrupt("killed")
        return real_step(self, model, inputs, num_items_in_batch)

    out = tmp_path / "killed"
    monkeypatch.setattr(MethodTrainer, "training_step", killed_at_step_3_of_stage_2)
    with pytest.raises(KeyboardInterrupt):
        main(argv("llava_c", ucit_root, tiny_llava, out, *llava_c_args))
    assert seen["checkpoints"] == ["checkpoint-2"]
    assert {TRAINABLE_FILE, METHOD_STATE_FILE, "optimizer.pt", "scheduler.pt"} <= set(seen["files"])
    assert seen["state"] == {"uir_step": 2}  # UIR inquiry batches drawn before the checkpoint
    monkeypatch.setattr(MethodTrainer, "training_step", real_step)
    assert main(["run", "--out", str(out), "--resume"]) == 0
    assert (out / "matrix.csv").read_text() == (uninterrupted / "matrix.csv").read_text()
    whole = [json.loads(x) for x in (uninterrupted / "records.jsonl").read_text().splitlines()]
    again = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    assert again[2]["train"]["resumed_from_step"] == 2
    assert again[2]["train"]["uir"] == whole[2]["train"]["uir"]  # the last step's UIR term


def test_a_crash_during_evaluation_keeps_the_training(
    ucit_root, tiny_llava, tmp_path, monkeypatch
) -> None:
    whole = tmp_path / "whole"
    assert main(argv("finetune", ucit_root, tiny_llava, whole)) == 0
    real_eval, trained = cl_bench.running.runner.evaluate_all, []

    def crash_in_stage_2(model, ctx, tasks, test_sets, stage, *args, **kwargs):
        if stage == 2:
            raise KeyboardInterrupt("killed while evaluating")
        return real_eval(model, ctx, tasks, test_sets, stage, *args, **kwargs)

    out = tmp_path / "crashed"
    monkeypatch.setattr(cl_bench.running.runner, "evaluate_all", crash_in_stage_2)
    with pytest.raises(KeyboardInterrupt):
        main(argv("finetune", ucit_root, tiny_llava, out))
    assert (out / "checkpoints" / "stage_2" / MODEL_FILE).is_file()
    assert (out / "checkpoints" / "stage_1").is_dir()  # removed once stage 2 is recorded
    monkeypatch.setattr(cl_bench.running.runner, "evaluate_all", real_eval)
    real_train = cl_bench.running.runner.train_model
    monkeypatch.setattr(cl_bench.running.runner, "train_model",
                        lambda *a, **k: trained.append(1) or real_train(*a, **k))
    assert main(["run", "--out", str(out), "--resume"]) == 0
    assert trained == []  # stage 2 was evaluated from its checkpoint, not trained again
    assert (out / "matrix.csv").read_text() == (whole / "matrix.csv").read_text()
    assert not (out / "checkpoints" / "stage_1").exists()


def test_a_checkpoint_of_another_base_is_refused(uninterrupted, tmp_path) -> None:
    from cl_bench.models.checkpoint import load_model_state

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    with pytest.raises(CLBenchError, match="differs: resume with the same --model"):
        load_model_state(None, uninterrupted / "checkpoints" / "stage_2", other)
