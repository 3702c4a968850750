"""KeepLoRA: the subspaces, the projection and the LoRA's A by hand, the gradient capture against
autograd, and one real stage of the tiny model."""

from __future__ import annotations

import pytest
import torch
from method_kit import make_context, planned, stage

from cl_bench.errors import CLBenchError
from cl_bench.method import parse_options
from cl_bench.models.deltas import PEFT_PREFIX
from methods.keeplora import (
    KeepLoRA,
    KeepLoRAOptions,
    grown_subspace,
    lora_a_init,
    principal_subspace,
    residual,
    weight_gradients,
)

E1 = torch.tensor([[1.0, 0.0, 0.0]])


def projector_of(rows: torch.Tensor) -> torch.Tensor:
    return rows.T @ rows  # sign-free: what a basis spans


def test_the_principal_subspace_lies_in_the_input_space_below_the_energy_share() -> None:
    weight = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # out 2 x in 3
    # W^T's left singular vectors e1 (s 3), e3 (s 1): energy shares 0.9, 1.0
    assert torch.allclose(projector_of(principal_subspace(weight, 0.95)), projector_of(E1))
    assert principal_subspace(weight, 0.5).shape == (1, 3)  # none below 0.5: at least one
    two = principal_subspace(torch.diag(torch.tensor([3.0, 2.0, 1.0])), 0.95)  # 9/14, 13/14
    assert torch.allclose(projector_of(two), torch.diag(torch.tensor([1.0, 1.0, 0.0])),
                          atol=1e-6)


def test_the_gradient_is_projected_off_the_protected_directions() -> None:
    gradient_t = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert residual(gradient_t, E1).tolist() == [[0.0, 0.0], [3.0, 4.0], [5.0, 6.0]]


def test_the_lora_a_takes_the_strongest_direction_left_after_the_projection() -> None:
    gradient = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 2.0]])  # G^T: e1 (5) and e3 (2)
    a = lora_a_init(gradient, E1, rank=1, seed=0)
    assert torch.allclose(a.abs(), torch.tensor([[0.0, 0.0, 1.0]]), atol=1e-5)


def test_the_subspace_grows_until_it_holds_the_energy_share() -> None:
    gradient = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 1.0]])  # G^T = [[3,0],[0,2],[0,1]]
    # total energy 14; M = e1 holds 9/14 = 0.643; the residual (0, 2, 1) holds 5/14 = 0.357
    grown = grown_subspace(gradient, E1, 0.99)
    assert grown.shape == (2, 3) and torch.equal(grown[0], E1[0])
    assert torch.allclose(grown[1].abs(), torch.tensor([0.0, 2.0, 1.0]) / 5**0.5, atol=1e-6)
    assert torch.equal(grown_subspace(gradient, E1, 0.6), E1)  # 0.643 >= 0.6: nothing added
    assert torch.equal(grown_subspace(torch.zeros(2, 3), E1, 0.99), E1)


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(5, 3)
        self.first = torch.nn.Linear(3, 4)
        self.second = torch.nn.Linear(4, 2)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(self.embed(ids)))).pow(2).mean()


def test_the_captured_weight_gradients_equal_autograds_with_the_model_frozen() -> None:
    torch.manual_seed(0)
    toy = Toy()
    batches = [torch.tensor([[1, 2, 3]]), torch.tensor([[4, 0, 2], [1, 1, 3]])]
    want = {"first": torch.zeros(4, 3), "second": torch.zeros(2, 4)}
    for ids in batches:
        toy.zero_grad()
        toy(ids).backward()
        for name in want:
            want[name] += toy.get_submodule(name).weight.grad
    toy.requires_grad_(False)
    with weight_gradients(toy, {"first": toy.first, "second": toy.second}) as sums:
        for ids in batches:
            toy(ids).backward()
    for name in want:
        assert torch.allclose(sums[name], want[name], atol=1e-6)
    assert toy.embed(batches[0]).requires_grad is False  # the hooks are gone


def test_a_stage_trains_b_on_a_frozen_a_orthogonal_to_the_protected_subspace(
    tiny_llava, ucit_root, tmp_path
) -> None:
    ctx = make_context("keeplora", tiny_llava, ucit_root, tmp_path, real_training=True)
    ctx.config.lora.rank = 4
    method = planned(KeepLoRA(parse_options(KeepLoRA, {}), ctx))
    first = stage(1, "ImageNet-R")
    model = method.before_stage(ctx.bundle.model, first)
    name, subspace = next(iter(method.subspaces.items()))
    adapted = model.get_submodule(PEFT_PREFIX + name)
    a = adapted.lora_A["default"].weight
    assert not a.requires_grad and adapted.lora_B["default"].weight.requires_grad
    assert adapted.scaling["default"] == pytest.approx(0.25)  # alpha = rank / 4
    assert torch.allclose(a @ a.T, torch.eye(4), atol=1e-4)
    assert (subspace @ a.T).abs().max() < 1e-4  # in the residual subspace
    layer = adapted.get_base_layer()
    assert torch.equal(subspace, principal_subspace(layer.weight, 0.6))  # release: 0.6
    ranks = {n: s.shape[0] for n, s in method.subspaces.items()}
    method.after_stage(model, first)
    assert all(method.subspaces[n].shape[0] >= k for n, k in ranks.items())
    assert any(method.subspaces[n].shape[0] > k for n, k in ranks.items())


def test_the_defaults_are_the_releases_ucit_recipe() -> None:
    o = KeepLoRAOptions()  # train_all.sh, train_post configs, Task*.sh
    assert (o.weight_energy, o.feature_energy, o.gradient_ratio, o.gradient_batch_size) == (
        0.6, 0.99, 0.2, 1)


@pytest.mark.parametrize(("given", "message"), [
    ({"weight_energy": 0.0}, "weight_energy"),
    ({"feature_energy": 1.5}, "feature_energy"),
    ({"gradient_ratio": -1}, "gradient_ratio"),
    ({"gradient_batch_size": 0}, "gradient_batch_size"),
])
def test_bad_options_stop_before_training(given: dict, message: str) -> None:
    with pytest.raises(CLBenchError, match=message):
        parse_options(KeepLoRA, given)


def test_a_rank_above_a_layers_width_is_refused(tiny_llava, ucit_root, tmp_path) -> None:
    ctx = make_context("keeplora", tiny_llava, ucit_root, tmp_path, real_training=True)
    with pytest.raises(CLBenchError, match="directions"):
        KeepLoRA(parse_options(KeepLoRA, {"rank": 100000}), ctx)
