import json
import math
from pathlib import Path

import pytest
import torch

from cl_bench.analysis.sweep import parse_alphas, sweep_alpha
from cl_bench.cli import main
from cl_bench.errors import CLBenchError
from cl_bench.models.deltas import LoraFactors
from methods.llava_c.consolidation import sac_delta
from methods.llava_c.method import consolidator, forward_kl, hidden_distance


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
def llava_c_run(tmp_path_factory, ucit_root: Path, tiny_llava: Path) -> Path:
    tmp = tmp_path_factory.mktemp("llava_c")
    inquiries = tmp / "inquiries.json"
    questions = ["What colour is the square?", "Generate a brief caption for the image."]
    inquiries.write_text(json.dumps([{"id": i, "text": q} for i, q in enumerate(questions * 4)]))
    out = tmp / "run"
    argv = ["run", "--method", "llava_c", "--suite", "ucit", "--data-root", str(ucit_root),
            "--model", str(tiny_llava), "--quick", "--order", "RA", "--out", str(out),
            "--general", "none", "--set", f"method.inquiry_file={inquiries}",
            "--set", "method.alpha=0.5", "--set", "eval.max_new_tokens=4",
            "--set", "train.learning_rate=0.05"]
    assert main(argv) == 0
    return out


def test_llava_c_stores_deltas_and_trains_with_uir(llava_c_run: Path) -> None:
    lines = (llava_c_run / "records.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["stage"] for r in records] == [0, 1, 2]
    assert all(r["train"]["uir"] >= 0 for r in records[1:])
    for stage in (1, 2):
        assert (llava_c_run / "deltas" / f"stage_{stage}.safetensors").exists()


def test_sweep_at_the_run_alpha_reproduces_the_run(llava_c_run: Path) -> None:
    csv = sweep_alpha(llava_c_run, 2, [0.5, 0.0], {"consolidation": "sac"})
    import pandas as pd

    frame = pd.read_csv(csv)
    matrix = pd.read_csv(llava_c_run / "matrix.csv", index_col="stage")
    for task in ("ImageNet-R", "ArxivQA"):
        assert frame.loc[frame.alpha == 0.5, task].item() == pytest.approx(matrix.loc[2, task])
    assert (csv.parent / "alpha.png").exists()


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
