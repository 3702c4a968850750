"""Runs under ``torchrun --nproc_per_node 2`` on the CPU (gloo): DDP and DeepSpeed ZeRO-2 give
the single process's numbers, rank 0 alone writes the run folder, a rank killed mid-stage leaves
a run that ``--resume`` completes. Plus the launch helpers, without launching.

Settings that make one process and two comparable: the global batch (8) is one micro-batch of 4
per process under two processes and two accumulated micro-batches in one, so each optimizer step
sees the same samples; LoRA dropout 0, because every process draws its own dropout masks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cl_bench.cli import main, without_nproc
from cl_bench.errors import CLBenchError
from cl_bench.running.launch import check_launcher, deepspeed_config, launcher_of, zero_stage

ROOT = Path(__file__).resolve().parents[1]
COMPARABLE = ["--quick", "--order", "RA", "--general", "none", "--set", "eval.max_new_tokens=4",
              "--set", "eval.limit=4", "--set", "train.max_steps=2", "--set", "lora.dropout=0",
              "--set", "train.global_batch_size=8", "--set", "train.batch_size=4",
              "--set", "train.learning_rate=0.01"]


def argv(method: str, out: Path, data: Path, model: Path, *extra: str) -> list[str]:
    return ["run", "--method", method, "--suite", "ucit", "--data-root", str(data),
            "--model", str(model), "--out", str(out), *COMPARABLE, *extra]


def torchrun(runs: list[list[str]], folder: Path, kill: dict | None = None):
    plan = folder / f"plan-{len(list(folder.glob('plan-*')))}.json"
    plan.write_text(json.dumps({"runs": runs, "kill": kill}))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(ROOT / "tests" / "launched_runs.py"), str(plan)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ucit_root: Path, tiny_llava: Path, tiny_clip: Path) -> dict:
    """Single-process and two-process runs of finetune, llava_c and hide_llava; finetune under
    ZeRO-2; a finetune run whose rank 1 is killed at stage 2, then resumed."""
    tmp = tmp_path_factory.mktemp("launchers")
    inquiries = tmp / "inquiries.json"
    questions = ["What colour is the square?", "Which option names the colour?"]
    inquiries.write_text(json.dumps([{"id": i, "text": q} for i, q in enumerate(questions * 8)]))
    extra = {"finetune": [], "llava_c": ["--set", f"method.inquiry_file={inquiries}"],
             "hide_llava": ["--set", f"method.encoder={tiny_clip}"]}
    out = {f"{m}/{kind}": tmp / kind / m for m in extra for kind in ("single", "ddp")}
    out |= {"finetune/zero2": tmp / "zero2" / "finetune", "killed": tmp / "killed" / "finetune"}
    launched = [argv(m, out[f"{m}/ddp"], ucit_root, tiny_llava, *extra[m]) for m in extra]
    launched.append(argv("finetune", out["killed"], ucit_root, tiny_llava))
    killed = torchrun(launched, tmp, kill={"run": len(launched) - 1, "stage": 2, "rank": 1})
    out["killed_log"] = killed.stdout + killed.stderr
    assert (out["killed"] / "records.jsonl").exists(), out["killed_log"][-5000:]
    out["killed_records"] = (out["killed"] / "records.jsonl").read_text()
    out["llava_c/zero2_bf16"] = tmp / "zero2_bf16" / "llava_c"
    resumed = torchrun([["run", "--out", str(out["killed"]), "--resume"],
                        argv("finetune", out["finetune/zero2"], ucit_root, tiny_llava,
                             "--deepspeed", "zero2"),
                        argv("llava_c", out["llava_c/zero2_bf16"], ucit_root, tiny_llava,
                             "--deepspeed", "zero2", "--set", "model.dtype=bf16",
                             *extra["llava_c"])], tmp)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-5000:]
    for method in extra:
        assert main(argv(method, out[f"{method}/single"], ucit_root, tiny_llava,
                         *extra[method])) == 0
    return out


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]


def weights(folder: Path, stage: int = 2) -> dict:
    return load_file(str(folder / "checkpoints" / f"stage_{stage}" / "model.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["finetune", "llava_c", "hide_llava"])
def test_ddp_gives_the_single_process_run(runs: dict, method: str) -> None:
    single, ddp = runs[f"{method}/single"], runs[f"{method}/ddp"]
    assert [r["stage"] for r in records(ddp)] == [0, 1, 2]  # one record per stage
    assert (ddp / "matrix.csv").read_text() == (single / "matrix.csv").read_text()
    # float32 summation order only: the ranks' average against accumulated micro-batches
    # (measured: finetune and hide_llava bit-identical, llava_c's UIR term 2e-10)
    assert max_difference(weights(single), weights(ddp)) < 1e-8
    for task in ("ImageNet-R", "ArxivQA"):
        path = Path("predictions") / "stage_2" / f"{task}.jsonl"
        assert (ddp / path).read_text() == (single / path).read_text()
    env = records(ddp)[-1]["environment"]
    assert (env["world_size"], env["launcher"]) == (2, "ddp")
    assert records(single)[-1]["environment"]["launcher"] == "single"
    assert not list(ddp.rglob("*.partial"))


@pytest.mark.slow
def test_hide_llava_keeps_the_same_experts_and_anchors_on_every_rank(runs: dict) -> None:
    single, ddp = runs["hide_llava/single"], runs["hide_llava/ddp"]
    for task in (1, 2):
        name = Path("checkpoints") / "stage_2" / "hide_llava" / f"task_{task}.safetensors"
        assert max_difference(load_file(str(single / name)), load_file(str(ddp / name))) == 0.0


@pytest.mark.slow
def test_zero2_gives_the_single_process_run_within_rounding(runs: dict) -> None:
    single, zero2 = runs["finetune/single"], runs["finetune/zero2"]
    assert [r["stage"] for r in records(zero2)] == [0, 1, 2]
    assert records(zero2)[-1]["environment"]["launcher"] == "zero2"
    # DeepSpeed flattens the gradients into its own buffers and sums them in another order:
    # float32 rounding, ~1e-7 per step on values of ~1e-2 (measured: 3e-7 after 6 steps)
    assert max_difference(weights(single), weights(zero2)) < 1e-5
    assert (zero2 / "matrix.csv").read_text() == (single / "matrix.csv").read_text()


@pytest.mark.slow
def test_zero2_in_bf16_gives_back_float32_trained_weights(runs: dict) -> None:
    """DeepSpeed's bf16 mode casts the model's parameters to bf16; what trains comes back in
    float32 from its master weights, so consolidation keeps the update (LLaVA-c, UIR on)."""
    run = runs["llava_c/zero2_bf16"]
    assert [r["stage"] for r in records(run)] == [0, 1, 2]
    assert records(run)[-1]["environment"]["dtype"] == "bfloat16"
    assert {str(v.dtype) for v in weights(run).values()} == {"torch.float32"}


@pytest.mark.slow
def test_a_rank_killed_mid_stage_leaves_a_run_that_resume_completes(runs: dict) -> None:
    assert "Signals.SIGKILL" in runs["killed_log"] or "exitcode  : -9" in runs["killed_log"]
    assert [json.loads(r)["stage"] for r in runs["killed_records"].splitlines()] == [0, 1]
    killed, ddp = runs["killed"], runs["finetune/ddp"]
    assert (killed / "matrix.csv").read_text() == (ddp / "matrix.csv").read_text()
    assert max_difference(weights(killed), weights(ddp)) == 0.0
    assert not (killed / "checkpoints" / "stage_1").exists()


def test_deepspeed_configs_and_zero3_refusal(tmp_path: Path) -> None:
    assert zero_stage(deepspeed_config("zero2")) == 2
    assert zero_stage(deepspeed_config("zero2_offload")) == 2
    assert launcher_of("zero2") == "zero2" and launcher_of(None, 1) == "single"
    assert launcher_of(None, 4) == "ddp"
    zero3 = tmp_path / "z3.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert launcher_of(str(zero3)) == "zero3"
    with pytest.raises(CLBenchError, match="method llava_c does not support the zero3 launcher"):
        check_launcher("llava_c", ("single", "ddp", "zero2"), "zero3")
    check_launcher("llava_c", ("single", "ddp", "zero2"), "zero2")
    with pytest.raises(CLBenchError, match="neither a shipped config"):
        deepspeed_config("zero5")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CLBenchError, match="bad.json: not a readable DeepSpeed JSON"):
        zero_stage(tmp_path / "bad.json")


def test_zero3_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    zero3 = tmp_path / "z3.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    out = tmp_path / "run"
    assert main(["run", "--method", "hide_llava", "--out", str(out),
                 "--deepspeed", str(zero3)]) == 2
    err = capsys.readouterr().err
    assert "method hide_llava does not support the zero3 launcher" in err
    assert not out.exists()


def test_nproc_is_taken_off_the_relaunched_command() -> None:
    assert without_nproc(["run", "--nproc", "2", "--quick"]) == ["run", "--quick"]
    assert without_nproc(["run", "--nproc=8", "--out", "x"]) == ["run", "--out", "x"]


def test_run_with_nproc_relaunches_itself_and_names_a_failure(monkeypatch, capsys) -> None:
    import cl_bench.running.launch

    calls, status = [], [0]
    monkeypatch.setattr(cl_bench.running.launch, "relaunch",
                        lambda argv, n: calls.append((argv, n)) or status[0])
    assert main(["run", "--method", "finetune", "--nproc", "2", "--quick"]) == 0
    assert calls == [(["run", "--method", "finetune", "--quick"], 2)]
    status[0] = 3
    assert main(["run", "--nproc", "2", "--quick"]) == 2
    assert "torchrun --nproc_per_node 2 failed (exit status 3" in capsys.readouterr().err
