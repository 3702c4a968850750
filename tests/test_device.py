"""Every tensor the project makes follows the model's device: runs, methods, probes, general
benchmarks, checkpoints, the alpha sweep and CKA on a simulated accelerator (``device_sim``),
where any tensor left on the CPU that meets the model fails as it would on CUDA."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from bench_files import write_bench, write_probes
from device_sim import DeviceMismatch, accelerator_runs, simulated_accelerator
from transformers import AutoTokenizer

from cl_bench.cli import main
from cl_bench.models.llava import load_llava
from cl_bench.registry import SUITES, get_suite
from tasks.micro.model import TinyConfig, build_clip, image_processor

SUITE = "ucit-on-device"  # ucit with probes, UIR inquiries and the micro general benchmarks


def test_the_simulated_accelerator_behaves_like_cuda() -> None:
    with simulated_accelerator() as device:
        on = torch.arange(6.0, device=device).view(2, 3)
        assert on.device == device and (on * 2).device == device
        assert torch.tensor([1, 2], device=device).tolist() == [1, 2]
        assert float(on.sum()) == 15.0 and on.cpu().device.type == "cpu"
        assert (on + torch.tensor(1.0)).device == device  # a CPU scalar is fine
        assert on[torch.tensor([1])].shape == (1, 3)  # so is a CPU index
        on.copy_(torch.ones(2, 3))  # and a copy across devices
        with pytest.raises(DeviceMismatch, match="aten.add"):
            on + torch.ones(2, 3)
        with pytest.raises(DeviceMismatch, match="aten.cat"):
            torch.cat([on, torch.zeros(1, 3)])
        with pytest.raises(TypeError, match="numpy"):
            on.numpy()


@pytest.fixture(scope="module")
def device_data(tmp_path_factory, ucit_root: Path) -> Path:
    """The UCIT fixture plus probes, inquiries and micro general benchmark files."""
    import shutil

    root = tmp_path_factory.mktemp("device_data")
    shutil.copytree(ucit_root / "UCIT", root / "UCIT")
    write_probes(root / "general")
    inquiries = [{"id": i, "text": q} for i, q in enumerate(["Say hi.", "Name a colour."] * 2)]
    (root / "general" / "inquiries.json").write_text(json.dumps(inquiries))
    write_bench(root, [("Is there a circle? Please answer yes or no.", "Yes")] * 2,
                {s: [("Is there a red circle in the image?", "yes")] for s in
                 ("random", "popular", "adversarial")},
                [("What colour is the circle?", ["red"], True)])
    if SUITE not in SUITES.names():
        SUITES.register(SUITE)(dataclasses.replace(
            get_suite("ucit"), name=SUITE, probe_file="general/probes.json",
            inquiry_file="general/inquiries.json",
            general_benchmarks=("micro_mme", "micro_pope", "micro_open"),
        ))
    return root


def run_argv(method: str, root: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--method", method, "--suite", SUITE, "--data-root", str(root),
            "--model", str(model), "--quick", "--order", "RA", "--out", str(out),
            "--set", "model.dtype=bf16", "--set", "lora.rank=4", "--set", "train.max_steps=2",
            "--set", "train.batch_size=2", "--set", "train.global_batch_size=4",
            "--set", "eval.limit=2", "--set", "eval.max_new_tokens=3", *extra]


@pytest.mark.slow
def test_llava_c_run_sweep_and_cka_on_the_accelerator(
    device_data, tiny_llava, tmp_path, monkeypatch
) -> None:
    from cl_bench.analysis.sweep import sweep_alpha

    out = tmp_path / "llava_c"
    with accelerator_runs(monkeypatch):
        assert main(run_argv("llava_c", device_data, tiny_llava, out,
                             "--set", "train.save_steps=1")) == 0
        records = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
        assert [r["stage"] for r in records] == [0, 1, 2]
        assert records[2]["train"]["uir"] >= 0 and "probes" in records[2]
        if records[0].get("general") is not None:  # lmms-eval installed
            assert set(records[2]["general"]) >= {"micro_mme", "micro_pope", "micro_open"}
        sweep = sweep_alpha(out, 2, [0.2, 0.0])
        assert sweep.is_file()
        assert main(["analyze", "cka", "--suite", SUITE, "--data-root", str(device_data),
                     "--model-a", str(tiny_llava), "--task-a", "R", "--task-b", "A",
                     "--limit", "2", "--out", str(tmp_path / "cka")]) == 0


@pytest.mark.slow
def test_hide_llava_run_and_task_models_on_the_accelerator(
    device_data, tiny_llava, tmp_path, monkeypatch
) -> None:
    clip = tmp_path / "clip"
    tokenizer = AutoTokenizer.from_pretrained(tiny_llava)
    tiny = TinyConfig(vision_hidden=32, vision_layers=1, clip_text_layers=1, projection_dim=24,
                      heads=2)
    build_clip(tiny, tokenizer).save_pretrained(clip)
    tokenizer.save_pretrained(clip)
    image_processor(tiny).save_pretrained(clip)
    out = tmp_path / "hide"
    with accelerator_runs(monkeypatch):
        assert main(run_argv("hide_llava", device_data, tiny_llava, out,
                             "--set", f"method.encoder={clip}", "--general", "none")) == 0
        last = json.loads((out / "records.jsonl").read_text().splitlines()[-1])
        assert set(last["method"]["routing_accuracy"]) >= {"ImageNet-R", "ArxivQA", "probes"}
        assert main(["analyze", "cka", "--run", str(out), "--limit", "2",
                     "--out", str(tmp_path / "cka")]) == 0


def test_a_forgotten_move_is_caught(tiny_llava, device_data, monkeypatch) -> None:
    """The planted bug: a batch that does not follow the model (probes, then UIR)."""
    import cl_bench.evaluation.probes as probes
    import methods.llava_c.method as llava_c
    from cl_bench.evaluation.probes import final_hidden_states, load_inquiries

    inquiries = load_inquiries(device_data / "general" / "probes.json")
    with accelerator_runs(monkeypatch) as device:
        bundle = load_llava(tiny_llava)
        assert next(bundle.model.parameters()).device == device
        final_hidden_states(bundle.model, bundle, inquiries, 2)  # as written: fine
        monkeypatch.setattr(probes, "to_model", lambda batch, model: batch)
        with pytest.raises(DeviceMismatch):
            final_hidden_states(bundle.model, bundle, inquiries, 2)
        monkeypatch.setattr(llava_c, "to_model", lambda batch, model: batch)
        from cl_bench.config import RunConfig
        from cl_bench.method import MethodContext, Stage

        cfg = RunConfig(method="llava_c", suite=SUITE)
        ctx = MethodContext(cfg, get_suite(SUITE), device_data, bundle, device_data / "run")
        method = llava_c.LlavaC(llava_c.LlavaCOptions(), ctx)
        model = method.before_stage(bundle.model, Stage(1, (get_suite(SUITE).task("ImageNet-R"),)))
        with pytest.raises(DeviceMismatch):
            method.extra_losses(model, {}, None)
