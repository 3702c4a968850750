"""SAME: the router and expert gradient transforms, the adaptive freezing, the routes and the
mixed experts by hand, the hooks on a layer, the routing prior, and the options."""

from __future__ import annotations

import math

import pytest
import torch

from cl_bench.config import method_recipe
from cl_bench.errors import CLBenchError
from cl_bench.method import parse_options
from cl_bench.models.moe_lora import SampleInputs
from methods.same.layer import (
    SAMELinear,
    SameSettings,
    covariance_estimate,
    curvature_gradient,
    freezing_masks,
    masked_routing,
    principal_count,
    spectral_router_gradient,
    top_two,
    windowed_mean,
)
from methods.same.method import SAME, SAMEOptions, routing_prior


def test_the_principal_count_keeps_the_shares_up_to_the_energy_plus_one() -> None:
    s = torch.tensor([3.0, 2.0, 1.0])  # shares 9/14 = 0.64, 13/14 = 0.93, 1
    assert [principal_count(s, e) for e in (0.5, 0.9, 1.0)] == [1, 2, 3]
    assert windowed_mean(s, 2).tolist() == [3.0, 2.5, 1.5]


def test_the_router_gradient_is_damped_along_the_strongest_input_directions() -> None:
    # k = 2 (shares 16/21 = 0.76 <= 0.9 < 20/21); S_smooth (4, 3); 1/S normalised (0.75, 1)
    # clamped to (0.8, 1); the third direction is outside: kept as it is
    grad = torch.tensor([[1.0, 1.0, 1.0]])
    out = spectral_router_gradient(grad, torch.eye(3), torch.tensor([4.0, 2.0, 1.0]), 0.9, 3)
    assert out.tolist()[0] == pytest.approx([0.8, 1.0, 1.0])


def test_the_expert_gradient_is_preconditioned_by_the_previous_covariance() -> None:
    # k = 2; along e1, e2: 1 / (S + mu) = 1 / 2.5, 1 / 1.5; across: 1 / mu = 2
    grad = torch.tensor([[1.0, 1.0, 1.0]])
    out = curvature_gradient(grad, torch.eye(3), torch.tensor([2.0, 1.0, 0.5]), 0.9, 0.5)
    assert out.tolist()[0] == pytest.approx([0.4, 2 / 3, 2.0])


def test_experts_useful_below_tau_freeze_but_never_the_tasks_own() -> None:
    util, imp = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.1, 0.1, 0.4])
    # scores minmax(util) - minmax(imp) = (1, 1/3, 0) - (0, 0, 1) = (1, 0.33, -1)
    assert freezing_masks(util, imp, 0.5, own=2).tolist() == [1.0, 0.0, 1.0]
    assert freezing_masks(util, imp, 0.5, own=1).tolist() == [1.0, 1.0, 0.0]
    routes = masked_routing(torch.tensor([[0.5, 0.3, 0.2], [0.0, 0.3, 0.0]]),
                            torch.tensor([1.0, 0.0, 1.0]), own=0)
    assert routes[0].tolist() == pytest.approx([0.5 / 0.7, 0.0, 0.2 / 0.7])
    assert routes[1].tolist() == [1.0, 0.0, 0.0]  # nothing left: the task's own expert


def test_inference_keeps_the_top_two_of_the_router_times_the_prior() -> None:
    w = torch.tensor([[0.2, 0.3, 0.5]])
    assert top_two(w, torch.ones(1, 3)).tolist()[0] == pytest.approx([0.0, 0.375, 0.625])
    assert top_two(w, torch.tensor([[1.0, 1.0, 0.0]])).tolist()[0] == pytest.approx(
        [0.4, 0.6, 0.0])


def test_the_covariance_estimate_finds_the_only_direction_the_inputs_vary_in() -> None:
    x = torch.tensor([[1.0, 5.0], [-1.0, 5.0], [2.0, 5.0], [-2.0, 5.0]])
    u, s = covariance_estimate(x, 2, torch.Generator().manual_seed(0))
    assert torch.allclose(u[:, 0].abs(), torch.tensor([1.0, 0.0]), atol=1e-6)
    assert s.tolist() == pytest.approx([math.sqrt(10 / 3), 0.0], abs=1e-6)


def hand_layer(inputs: SampleInputs) -> SAMELinear:
    """E = 2 experts of rank 1 on a zero 2 x 2 base, scaling 1, router and factors = I."""
    base = torch.nn.Linear(2, 2, bias=False)
    torch.nn.init.zeros_(base.weight)
    layer = SAMELinear(base, experts=2, rank=2, scaling=1.0, dropout=0.0, inputs=inputs,
                       settings=SameSettings(), seed=0)
    with torch.no_grad():
        for p in (layer.A, layer.B, layer.router):
            p.copy_(torch.eye(2))
    return layer


def test_the_layer_mixes_both_factors_by_the_routes() -> None:
    inputs = SampleInputs()
    inputs.features = torch.ones(1, 2)  # a flat prior
    layer = hand_layer(inputs).eval()
    # inference: w = softmax((2, 0) / E) = (0.731059, 0.268941); a = w_0 A_0 x + w_1 A_1 x = 2 w_0;
    # out = a (w_0 B_0 + w_1 B_1) = 1.462117 (0.731059, 0.268941)
    out = layer(torch.tensor([[[2.0, 0.0]]]))
    assert out[0, 0].tolist() == pytest.approx([1.068893, 0.393224], abs=1e-5)
    layer.train()  # training: w = softmax(2, 0) = (0.8808, 0.1192), and the EMAs move
    assert layer.routes(torch.tensor([[[2.0, 0.0]]]))[0].tolist() == pytest.approx(
        [0.880797, 0.119203], abs=1e-5)
    assert layer.utilization.tolist() == pytest.approx(
        [0.95 * 0.5 + 0.05 * 0.880797, 0.95 * 0.5 + 0.05 * 0.119203], abs=1e-6)
    assert layer.step == 1


def test_the_expert_hook_applies_from_the_second_task_on() -> None:
    x = torch.tensor([[[2.0, 1.0], [0.5, -1.0]]])
    grads = []
    for task in (0, 1):
        inputs = SampleInputs()
        layer = hand_layer(inputs).train()
        layer.start_task(task)
        with torch.no_grad():
            layer.prev_U.copy_(torch.eye(2))
            layer.prev_S.copy_(torch.tensor([2.0, 1.0]))
            layer.prev_valid.fill_(True)
        layer(x).pow(2).sum().backward()
        grads.append(layer.A.grad)
    s = SameSettings()
    want = curvature_gradient(grads[0], torch.eye(2), torch.tensor([2.0, 1.0]), s.energy, s.mu)
    assert not torch.allclose(grads[0], grads[1])
    assert torch.allclose(grads[1], want, atol=1e-6)


def test_the_prior_is_a_sharp_softmax_over_the_learned_tasks_anchors() -> None:
    text = torch.tensor([[0.5, 0.0], [0.5, 0.0]])
    image = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    prior = routing_prior(text, image, torch.tensor([True, False]), 0.2, 2.0, experts=3)
    # with an image: 0.2 (0, 1) + 0.8 (0.5, 0) = (0.4, 0.2); without: (0.5, 0); softmax of 2x
    # the similarities, none for the third expert (a task not learned yet)
    assert prior[0].tolist() == pytest.approx([1 / (1 + math.exp(-0.4)),
                                               1 / (1 + math.exp(0.4)), 0.0])
    assert prior[1].tolist() == pytest.approx([1 / (1 + math.exp(-1.0)),
                                               1 / (1 + math.exp(1.0)), 0.0])


def test_the_defaults_are_the_releases() -> None:
    o = SAMEOptions()  # config/methods/same.py (LLaVA), RouterIntegration
    assert (o.tau, o.mu, o.window, o.components, o.energy) == (0.1, 0.9, 3, 64, 0.9)
    assert (o.prior_scale, o.image_weight, SAME.rank_per_expert) == (28.0, 0.2, 8)


def test_the_recipe_adapts_the_ffn_with_the_projector_frozen() -> None:
    recipe = method_recipe("same")  # config/methods/same.py: peft_target_modules ffn
    assert recipe["lora.targets"] == ["gate_proj", "up_proj", "down_proj"]
    assert recipe["lora.train_projector"] is False and recipe["lora.dropout"] == 0.05


@pytest.mark.parametrize(("given", "message"), [
    ({"mu": 0.0}, "mu"),
    ({"energy": 1.5}, "energy"),
    ({"image_weight": -0.1}, "image_weight"),
    ({"components": 0}, "components"),
    ({"text_feature": "mean"}, "text_feature"),
])
def test_bad_options_stop_before_training(given: dict, message: str) -> None:
    with pytest.raises(CLBenchError, match=message):
        parse_options(SAME, given)
