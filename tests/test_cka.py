"""Linear CKA (HiDe-LLaVA appendix B) and the ``clbench analyze cka`` command."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from cl_bench.analysis.cka import centered, cka_by_layer, hsic, layer_features, linear_cka
from cl_bench.cli import main
from cl_bench.errors import CLBenchError
from cl_bench.models.llava import load_llava
from tasks.loaders import load_samples

# Hand-computed example: both matrices have zero column means.
# X^T Y = [[3, -1], [3, 3]] -> tr(K_X K_Y) = ||X^T Y||_F^2 = 28;
# X^T X = [[2, 0], [0, 6]] -> 40; Y^T Y = [[6, 0], [0, 2]] -> 40; CKA = 28 / sqrt(40 * 40) = 0.7.
X = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [0.0, -2.0]])
Y = torch.tensor([[2.0, 0.0], [-1.0, 1.0], [-1.0, -1.0]])


def test_cka_of_a_representation_with_itself_is_one() -> None:
    features = torch.randn(20, 7)
    assert linear_cka(features, features) == pytest.approx(1.0, abs=1e-12)


def test_cka_against_the_hand_computed_example() -> None:
    assert linear_cka(X, Y) == pytest.approx(0.7, abs=1e-12)
    # centering (appendix B, step 1): shifting the features changes nothing
    assert linear_cka(X + torch.tensor([5.0, -3.0]), Y - 2.0) == pytest.approx(0.7, abs=1e-12)


def test_kernel_form_of_appendix_b_matches() -> None:
    k_x, k_y = centered(X) @ centered(X).T, centered(Y) @ centered(Y).T
    assert float(hsic(k_x, k_y)) == pytest.approx(28 / 4)  # tr(K_X K_Y) / (n - 1)^2, n = 3
    kernel_cka = hsic(k_x, k_y) / torch.sqrt(hsic(k_x, k_x) * hsic(k_y, k_y))
    assert float(kernel_cka) == pytest.approx(linear_cka(X, Y))


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(30, 6, dtype=torch.float64), torch.randn(30, 9, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    reference = linear_cka(a, b)
    assert linear_cka(a @ q, b) == pytest.approx(reference, abs=1e-9)
    assert linear_cka(3.5 * a, 0.2 * b) == pytest.approx(reference, abs=1e-9)
    assert 0.0 <= reference <= 1.0


def test_cka_rejects_mismatched_or_degenerate_inputs() -> None:
    with pytest.raises(CLBenchError, match="same samples"):
        linear_cka(torch.randn(4, 2), torch.randn(5, 2))
    with pytest.raises(CLBenchError, match="constant"):
        linear_cka(torch.ones(4, 2), torch.randn(4, 2))


def test_layer_features_per_decoder_layer(tiny_llava, ucit_root) -> None:
    bundle = load_llava(tiny_llava)
    folder = ucit_root / "UCIT" / "ImageNet-R"
    samples = load_samples(folder / "test.json", ucit_root / "UCIT" / "datasets")
    layers = bundle.model.config.text_config.num_hidden_layers
    hidden = bundle.model.config.text_config.hidden_size
    for point in ("mlp", "block"):
        features = layer_features(bundle.model, bundle, samples, point, batch_size=3)
        assert len(features) == layers
        assert all(f.shape == (len(samples), hidden) for f in features)
        assert cka_by_layer(features, features) == pytest.approx([1.0] * layers)


def test_analyze_cka_command_writes_table_and_heatmap(tiny_llava, ucit_root, tmp_path) -> None:
    out = tmp_path / "cka"
    code = main([
        "analyze", "cka", "--model-a", str(tiny_llava), "--suite", "ucit", "--data-root",
        str(ucit_root), "--task-a", "ImageNet-R", "--task-b", "A", "--limit", "4",
        "--out", str(out),
    ])
    assert code == 0
    with open(out / "cka.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["layer"]) for r in rows] == [1, 2]
    assert {r["task_b"] for r in rows} == {"ArxivQA"}
    assert all(0.0 <= float(r["cka"]) <= 1.0 + 1e-9 and not math.isnan(float(r["cka"]))
               for r in rows)
    assert "| pair |" in (out / "cka.md").read_text()
    assert (out / "cka.png").stat().st_size > 0


def test_analyze_cka_needs_a_task(tiny_llava, ucit_root, tmp_path) -> None:
    code = main(["analyze", "cka", "--model-a", str(tiny_llava), "--suite", "ucit",
                 "--data-root", str(ucit_root), "--out", str(tmp_path)])
    assert code == 2


def test_cka_report_of_three_task_models(tmp_path) -> None:
    from reports.cka_plot import CkaRow, markdown, task_matrix, write_cka_report

    tasks = ["R", "A", "V"]
    rows = [CkaRow("m", a, "m", b, layer, 0.9 if layer < 3 else 0.4)
            for i, a in enumerate(tasks) for b in tasks[i + 1 :] for layer in (1, 2, 3)]
    names = [p.name for p in write_cka_report(rows, tmp_path, "three tasks")]
    assert names == ["cka.csv", "cka.md", "cka.png", "cka_layers.png"]
    assert "| R vs A | 0.900 | 0.900 | 0.400 | 0.900 | 0.400 |" in markdown(rows, "t")
    order, matrix = task_matrix(rows, 3)
    assert order == tasks and matrix[0] == [1.0, 0.4, 0.4]
