"""Model Tailor: the patch of a 2 x 3 toy weight by hand, the compensation's effect on a layer's
output, the tailored model after a stage, options, and an end-to-end run with resume."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from method_kit import make_context, run_and_resume, stage, trained_like

from cl_bench.errors import CLBenchError
from cl_bench.method import parse_options
from cl_bench.models.deltas import PEFT_PREFIX
from cl_bench.models.lora import projector
from methods.model_tailor.method import ModelTailor, ModelTailorOptions
from methods.model_tailor.tailoring import (
    importance,
    inverse_hessian_factor,
    reverted_entries,
    tailor_weight,
)

# U, the upper Cholesky factor of H^-1, chosen by hand: H^-1 = U^T U = [[1, .5, 0], [.5, 1.25, 0],
# [0, 0, 1]], so H = [[1.25, -.5, 0], [-.5, 1, 0], [0, 0, 1]] (det of the 2 x 2 block is 1)
U = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
H = torch.tensor([[1.25, -0.5, 0.0], [-0.5, 1.0, 0.0], [0.0, 0.0, 1.0]])
BEFORE = torch.zeros(2, 3)
TUNED = torch.tensor([[1.0, 2.0, 0.5], [3.0, 1.0, 2.0]])


def z(values: list[float]) -> list[float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return [(v - mean) / std for v in values]


def test_importance_and_patch_of_a_2x3_toy_weight() -> None:
    assert torch.allclose(inverse_hessian_factor(H, damp=0.0), U, atol=1e-6)
    # salience |W_ft - W_pre| = |W_ft|; sensitivity W^2 / U_jj^2 = W^2 (U has a unit diagonal)
    expected = [[0.8 * s + 0.2 * t for s, t in zip(z([abs(w) for w in row]),
                                                   z([w * w for w in row]), strict=True)]
                for row in TUNED.tolist()]
    scores = importance(TUNED.abs(), TUNED**2, 0.8)
    assert torch.allclose(scores, torch.tensor(expected), atol=1e-5)
    # row 0: (-0.250, 1.100, -0.850); row 1: (1.014, -0.981, -0.033); sorted[int(6 * 0.5)]
    # = -0.033, so the four entries at or below it revert and (0, 1), (1, 0) form the patch
    assert reverted_entries(scores, 0.5).tolist() == [[True, False, True], [False, True, True]]


def test_salience_is_the_change_from_the_weight_before() -> None:
    before = torch.ones(2, 3)
    tuned = torch.tensor([[1.5, 3.0, 1.1], [1.2, 0.0, 4.0]])
    # salience weight 1: importance = z(|tuned - before|) = z((.5, 2, .1)), z((.2, 1, 3)) =
    # (-0.366, 1.131, -0.765), (-0.832, -0.277, 1.109); sorted[int(6 * 0.34)] = -0.366, so
    # (1, 0), (0, 2) and (0, 0) revert (z(|tuned|) would revert (1, 1) instead of (1, 0))
    tailored = tailor_weight(tuned, before, torch.eye(3), 0.34, salience_weight=1.0, damp=0.0,
                             compensation="none")
    assert tailored.tolist() == [[1.0, 3.0, 1.0], [1.0, 0.0, 4.0]]


def test_sensitivity_divides_by_the_squared_diagonal_of_u() -> None:
    # H = diag(36, 1, 1/4): U = H^-1/2 = diag(1/6, 1, 2); salience weight 0: importance =
    # z(W^2 / U_jj^2) = z((36, 4, 2.25)), lowest at column 2 (W^2 / U_jj = (6, 4, 4.5) would be
    # lowest at column 1); sparsity 0 reverts exactly the lowest entry
    hessian = torch.diag(torch.tensor([36.0, 1.0, 0.25]))
    tailored = tailor_weight(torch.tensor([[1.0, 2.0, 3.0]]), torch.zeros(1, 3), hessian, 0.0,
                             salience_weight=0.0, damp=0.0, compensation="none")
    assert tailored.tolist() == [[1.0, 2.0, 0.0]]


def test_damping_is_a_share_of_the_mean_diagonal() -> None:
    # diag (2, 4, 0): the dead input gets 1, mean 7/3; + 0.5 * 7/3 on the diagonal; U = H^-1/2
    U_ = inverse_hessian_factor(torch.diag(torch.tensor([2.0, 4.0, 0.0])), damp=0.5)
    damped = [2 + 7 / 6, 4 + 7 / 6, 1 + 7 / 6]
    assert torch.allclose(U_, torch.diag(torch.tensor([1 / math.sqrt(d) for d in damped])))


@pytest.mark.parametrize(("compensation", "patched"), [
    # column 0: row 0 reverts (1 -> 0), error 1 / U_00 = 1 spreads onto column 1 as +-1 * U_01
    ("reference", 2.5), ("obs", 1.5), ("none", 2.0),
])
def test_the_patch_decorator_by_hand(compensation: str, patched: float) -> None:
    tailored = tailor_weight(TUNED, BEFORE, H, sparsity=0.5, damp=0.0, compensation=compensation)
    # column 1: row 1 reverts, its error reaches only column 2 through U_12 = 0; column 2 reverts
    assert tailored.tolist() == [[0.0, patched, 0.0], [3.0, 0.0, 0.0]]
    # blocks of 2 columns: in block 1 each row's z-scores are (-1, 1) / sqrt(2); sorted[int(4 *
    # 0.25)] = -0.707 reverts (0, 0) and (1, 1), and column 0's error reaches column 1 as before
    blocked = tailor_weight(TUNED, BEFORE, H, sparsity=0.25, blocksize=2, damp=0.0,
                            compensation=compensation)
    assert blocked[:, :2].tolist() == [[0.0, patched], [3.0, 0.0]]


def test_obs_compensation_reduces_the_output_change_and_the_reference_sign_adds_to_it() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=gen) @ torch.randn(16, 16, generator=gen)  # correlated
    before = torch.randn(8, 16, generator=gen)
    tuned = before + 0.1 * torch.randn(8, 16, generator=gen)
    hessian = 2 * x.T @ x / len(x)
    error = {c: ((tailor_weight(tuned, before, hessian, 0.7, blocksize=4, compensation=c)
                  - tuned) @ x.T).norm().item() for c in ("reference", "obs", "none")}
    assert error["obs"] < error["none"] < error["reference"], error


# -- options -------------------------------------------------------------------------------------
def test_bad_options_are_clear_errors(tiny_llava, ucit_root, tmp_path) -> None:
    ctx = make_context("model_tailor", tiny_llava, ucit_root, tmp_path)
    for given, message in [({"sparsity": 1.0}, "method.sparsity=1.0"),
                           ({"salience_weight": 1.2}, "method.salience_weight=1.2"),
                           ({"calibration_samples": 0}, "method.calibration_samples=0"),
                           ({"blocksize": 0}, "method.blocksize=0"),
                           ({"damp": -0.1}, "method.damp=-0.1"),
                           ({"compensation": "plus"}, "method.compensation='plus'")]:
        with pytest.raises(CLBenchError, match=message):
            ModelTailor(parse_options(ModelTailor, given), ctx)
    with pytest.raises(CLBenchError, match="not positive definite"):
        inverse_hessian_factor(torch.tensor([[1.0, 2.0], [2.0, 1.0]]), damp=0.0)


# -- the tailored model --------------------------------------------------------------------------
@pytest.mark.parametrize("compensation", ["none", "reference"])
def test_a_tailored_stage_keeps_a_patch_of_each_update(
    tiny_llava, ucit_root, tmp_path, compensation
) -> None:
    ctx = make_context("model_tailor", tiny_llava, ucit_root, tmp_path)
    options = ModelTailorOptions(calibration_samples=4, calibration_batch=2,
                                 compensation=compensation)
    method = ModelTailor(options, ctx)
    plain = ctx.bundle.model
    weights = {n: p.detach().clone() for n, p in plain.named_parameters()}
    model = method.before_stage(plain, stage(1, "ImageNet-R"))
    trained_like(model, 1)
    names = [n.removeprefix(PEFT_PREFIX) for n, m in model.named_modules() if hasattr(m, "lora_A")
             and "default" in m.lora_A]
    tuned = {}
    for name in names:
        m = model.get_submodule(PEFT_PREFIX + name)
        tuned[name] = m.base_layer.weight + m.scaling["default"] * (
            m.lora_B["default"].weight @ m.lora_A["default"].weight)
    tailored = method.after_stage(model, stage(1, "ImageNet-R"))
    assert not any("lora" in n for n, _ in tailored.named_parameters())
    shares = []
    for name in names:
        now, was = tailored.get_submodule(name).weight, weights[name + ".weight"]
        changed = now != was
        # 90 % (+ the threshold entry) of each 64-column block went back exactly
        assert changed.float().mean() <= 0.1 + 1e-9
        shares.append(changed.float().mean().item())
        # the patch: the tuned entries themselves, or compensated ones
        assert torch.equal(now[changed], tuned[name][changed]) == (compensation == "none")
    assert min(shares) > 0.05
    assert method.after_evaluation(stage(1, "ImageNet-R"))["patch_share"] == pytest.approx(
        sum(shares) / len(shares), rel=0.05)
    for n, p in projector(tailored).named_parameters():  # reverted, as the reference does
        assert torch.equal(p, weights[f"model.multi_modal_projector.{n}"])


@pytest.mark.slow
def test_end_to_end_run_and_resume(tiny_llava, ucit_root, tmp_path, monkeypatch) -> None:
    from reports.run_folder import read_records

    out, _ = run_and_resume("model_tailor", ucit_root, tiny_llava, tmp_path, monkeypatch,
                            "method.calibration_samples=4")
    assert 0 < read_records(out)[-1]["method"]["patch_share"] <= 0.1


def test_layer_hessians_are_those_of_the_layer_inputs(tiny_llava, ucit_root, tmp_path) -> None:
    from methods.model_tailor.calibration import calibration_batches, layer_hessians

    ctx = make_context("model_tailor", tiny_llava, ucit_root, tmp_path)
    model = ctx.bundle.model.eval()
    samples = ctx.train_samples(stage(1, "ArxivQA").tasks[0])
    samples[1] = dataclasses.replace(samples[1], turns=((samples[1].question, "B, the second"),))
    batches = calibration_batches(ctx.bundle, samples[:3], 3, 2, 512, 0)
    assert [len(b["input_ids"]) for b in batches] == [2, 1]
    assert not batches[0]["attention_mask"].all()  # one of the two is padded
    layers = model.model.language_model.layers
    targets = {"self_attn.q_proj": layers[0].self_attn.q_proj,
               "mlp.down_proj": layers[0].mlp.down_proj}
    seen: dict[str, list] = {"self_attn.q_proj": [], "mlp.down_proj": [], "above": []}
    hooks = [m.register_forward_pre_hook(lambda _, args, n=n: seen[n].append(args[0]))
             for n, m in [*targets.items(), ("above", layers[1].self_attn.q_proj)]]
    hessians = layer_hessians(model, layers[0], targets, batches)
    for hook in hooks:
        hook.remove()
    assert not seen["above"]  # the forward pass stopped after layer 0
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    for name in targets:
        rows = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(seen[name], batches,
                                                                          strict=True)])
        assert rows.shape[0] == tokens  # padding excluded
        assert torch.allclose(hessians[name], 2 * rows.T @ rows / tokens, atol=1e-4)
