import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import INQUIRY_FILE
from run_kit import LEARNING, assert_same_run, kill_after_predictions, stage_answers

from cl_bench.analysis.sweep import parse_alphas, sweep_alpha
from cl_bench.cli import main
from cl_bench.errors import CLBenchError
from cl_bench.models.deltas import LoraFactors
from methods.llava_c.consolidation import sac_delta
from methods.llava_c.method import consolidator, forward_kl, hidden_distance

TASKS = ("ImageNet-R", "CLEVR-Math")


def test_uir_distances_hand_computed() -> None:
    current = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    previous = torch.zeros_like(current)
    mask = torch.tensor([[1, 0]])  # the second position is padding
    # MSE over the one real position: (1^2 + 2^2) / (1 position * 2 dims) = 2.5
    assert hidden_distance(current, previous, mask, "mse").item() == pytest.approx(2.5)
    # per-token L2: sqrt(1 + 4) averaged over 1 position
    assert hidden_distance(current, previous, mask, "l2").item() == pytest.approx(math.sqrt(5))


def test_forward_kl_hand_computed() -> None:
    previous = torch.tensor([[[0.0, 0.0]]])  # p = (1/2, 1/2)
    current = torch.tensor([[[math.log(3.0), 0.0]]])  # q = (3/4, 1/4)
    mask = torch.tensor([[1]])
    # KL(p||q) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)
    assert forward_kl(current, previous, mask).item() == pytest.approx(0.5 * math.log(4 / 3))
    assert forward_kl(previous, previous, mask).item() == pytest.approx(0.0)


def test_consolidators_on_lora_factors() -> None:
    gen = torch.Generator().manual_seed(0)
    factors = LoraFactors(torch.randn(12, 3, generator=gen), torch.randn(3, 9, generator=gen), 2.0)
    full = factors.product()
    # a LoRA update stays factors (float32) whatever the consolidation
    assert torch.allclose(consolidator("none", "pad")(factors)(0.3).product(), full)
    assert torch.allclose(consolidator("modelmix", "pad")(factors)(0.3).product(), 0.3 * full)
    sac = consolidator("sac", "pad")
    assert torch.allclose(sac(factors)(0.3).product(), sac_delta(full, 0.3), atol=1e-5)
    assert torch.allclose(sac(full)(0.3), sac_delta(full, 0.3))
    with pytest.raises(CLBenchError, match="alpha"):
        sac(factors)(1.5)
    with pytest.raises(CLBenchError, match="consolidation"):
        consolidator("mean", "pad")


def test_parse_alphas() -> None:
    assert parse_alphas("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert len(parse_alphas("0:1:0.1")) == 11
    assert parse_alphas("0.2,0.5") == [0.2, 0.5]
    for bad in ("0:2:0.5", "x", "0:1:0", "-0.1"):
        with pytest.raises(CLBenchError):
            parse_alphas(bad)


@pytest.fixture(scope="module")
def llava_c_run(tmp_path_factory, ucit_root: Path, taught_llava: Path) -> Path:
    out = tmp_path_factory.mktemp("llava_c") / "run"
    assert main(llava_c_argv(ucit_root, taught_llava, out)) == 0
    return out


def llava_c_argv(ucit_root: Path, model: Path, out: Path) -> list[str]:
    return ["run", "--method", "llava_c", "--suite", "ucit", "--data-root", str(ucit_root),
            "--model", str(model), "--quick", "--order", "RC", "--out", str(out),
            "--general", "none", "--set", f"method.inquiry_file={INQUIRY_FILE}",
            "--set", "method.alpha=0.5", "--set", "eval.max_new_tokens=4", *LEARNING,
            "--set", "train.learning_rate=0.01"]  # half of a stage's update must move answers


def test_llava_c_stores_deltas_and_trains_with_uir(llava_c_run: Path) -> None:
    lines = (llava_c_run / "records.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["stage"] for r in records] == [0, 1, 2]
    assert all(r["train"]["uir"] > 0 for r in records[1:])
    for stage in (1, 2):
        assert (llava_c_run / "deltas" / f"stage_{stage}.safetensors").exists()


def sweep_rows(run: Path, alphas: list[float], consolidation: str) -> list[list[float]]:
    """Stage 2 re-consolidated at each alpha, in one sweep: the task scores per alpha."""
    frame = pd.read_csv(sweep_alpha(run, 2, alphas, {"consolidation": consolidation}))
    return [[row[task] for task in TASKS] for _, row in frame.iterrows()]


def test_sweep_at_the_run_alpha_reproduces_the_run(llava_c_run: Path) -> None:
    matrix = pd.read_csv(llava_c_run / "matrix.csv", index_col="stage")
    rows = [[matrix.loc[stage, task] for task in TASKS] for stage in (0, 1, 2)]
    assert min(rows[0]) > 10  # real scores
    assert stage_answers(llava_c_run, 1) != stage_answers(llava_c_run, 2)  # stage 2 moves
    # alpha 1 first: each alpha starts again from the model before stage 2
    other, same = sweep_rows(llava_c_run, [1.0, 0.5], "sac")
    assert same == pytest.approx(rows[2], abs=0.005) and other != same
    # stage 2's update left out: the model after stage 1, rebuilt from the stored deltas
    half, none = sweep_rows(llava_c_run, [0.5, 0.0], "modelmix")
    assert none == pytest.approx(rows[1], abs=0.005) and half != none
    # SAC makes a difference here: a plain merge of stage 2 scores otherwise
    (plain,) = sweep_rows(llava_c_run, [0.5], "none")
    assert plain != pytest.approx(rows[2], abs=0.005)
    assert (llava_c_run / "sweeps" / "stage_2_sac" / "alpha.png").exists()


def test_resume_of_a_killed_llava_c_run_gives_the_same_run(
    llava_c_run: Path, ucit_root: Path, taught_llava: Path, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "killed"
    kill_after_predictions(monkeypatch, 5)  # in stage 2's evaluation, its delta written
    with pytest.raises(KeyboardInterrupt):
        main(llava_c_argv(ucit_root, taught_llava, out))
    assert (out / "deltas" / "stage_2.safetensors").is_file()
    monkeypatch.undo()
    assert main(["run", "--out", str(out), "--resume"]) == 0
    assert_same_run(out, llava_c_run, "deltas")


def test_sweep_command_passes_its_options_on(tmp_path: Path, monkeypatch, capsys) -> None:
    import cl_bench.analysis.sweep

    calls = []
    monkeypatch.setattr(cl_bench.analysis.sweep, "sweep_alpha",
                        lambda *args: calls.append(args) or tmp_path / "alpha.csv")
    argv = ["sweep-alpha", str(tmp_path), "--stage", "2", "--alphas", "0,0.5",
            "--consolidation", "modelmix", "--set", "method.uir=none"]
    assert main(argv) == 0
    assert calls == [(tmp_path, 2, [0.0, 0.5], {"uir": "none", "consolidation": "modelmix"})]
    assert str(tmp_path / "alpha.csv") in capsys.readouterr().out
    assert main(["sweep-alpha", str(tmp_path), "--stage", "2", "--set", "uir=none"]) == 2
    assert "expected method.KEY=VALUE" in capsys.readouterr().err


def test_sweep_errors(llava_c_run: Path, tmp_path: Path) -> None:
    with pytest.raises(CLBenchError, match="no stored delta for stage 3"):
        sweep_alpha(llava_c_run, 3, [0.5])
    with pytest.raises(CLBenchError, match="consolidation"):
        sweep_alpha(llava_c_run, 2, [0.5], {"consolidation": "svd"})
    finetune_dir = tmp_path / "ft"
    finetune_dir.mkdir()
    config = (llava_c_run / "config.yaml").read_text()
    config = config.replace("method: llava_c", "method: finetune")
    (finetune_dir / "config.yaml").write_text(config)
    with pytest.raises(CLBenchError, match="stores no deltas"):
        sweep_alpha(finetune_dir, 1, [0.5])


def test_the_sweep_restores_layers_and_full_parameters_between_alphas(tiny_llava: Path) -> None:
    """Each alpha starts from the model before the swept stage: its LoRA updates removed and
    its full parameters (the projector) put back, whatever the previous alpha added."""
    from cl_bench.analysis.sweep import mark, restore
    from cl_bench.models.deltas import StageDelta
    from cl_bench.models.llava import load_llava
    from cl_bench.models.updates import apply_delta

    model = load_llava(tiny_llava).model
    layer = "model.language_model.layers.0.self_attn.q_proj"
    projector = "model.multi_modal_projector.linear_1.weight"
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    weight = params[f"{layer}.weight"]
    delta = StageDelta(
        lora={layer: LoraFactors(torch.randn(weight.shape[0], 2, generator=gen),
                                 torch.randn(2, weight.shape[1], generator=gen), 1.0)},
        full={projector: torch.randn(params[projector].shape, generator=gen)},
    )
    x = torch.randn(3, weight.shape[1], generator=gen)
    before = (model.get_submodule(layer)(x).clone(), params[projector].detach().clone())
    marked = mark(model, delta)
    for alpha in (1.0, 0.5):
        restore(model, marked)
        apply_delta(model, delta, lambda u, a=alpha: a * torch.as_tensor(
            u.product() if isinstance(u, LoraFactors) else u))
        assert not torch.allclose(dict(model.named_parameters())[projector], before[1])
    restore(model, marked)
    assert torch.equal(dict(model.named_parameters())[projector], before[1])
    assert torch.allclose(model.get_submodule(layer)(x), before[0], atol=1e-6)
