"""Per-sample mixtures of stored LoRA experts and of whole modules (shared by HiDe-LLaVA, DISCO,
MR-LoRA), stored LoRA files, loading factors and projectors, and the routing confusion counts."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from cl_bench.errors import CLBenchError
from cl_bench.evaluation.routing_counts import RoutingCounts
from cl_bench.models.deltas import LoraFactors, load_lora_file, save_lora_file
from cl_bench.models.routed_lora import (
    RoutedLoRALinear,
    RoutedModule,
    Routing,
    anchor_similarity,
    route_modules,
)


def factors(out: int, inp: int, rank: int, scaling: float, seed: int) -> LoraFactors:
    gen = torch.Generator().manual_seed(seed)
    return LoraFactors(torch.randn(out, rank, generator=gen), torch.randn(rank, inp, generator=gen),
                       scaling)


def test_anchor_similarity_is_cosine() -> None:
    sims = anchor_similarity(torch.tensor([[1.0, 0.0], [1.0, 1.0]]),
                             torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
    half = 1 / math.sqrt(2)
    assert torch.allclose(sims, torch.tensor([[1.0, 0.0], [half, half]]))


def test_routed_module_mixes_experts_per_sample() -> None:
    base = torch.nn.Linear(5, 6)
    experts = [factors(6, 5, 2, 2.0, 1), factors(6, 5, 2, 0.5, 2)]
    routing = Routing()
    module = RoutedLoRALinear(base, experts, routing)
    x = torch.randn(2, 4, 5)
    with pytest.raises(CLBenchError, match="routing weights are not set"):
        module(x)
    routing.weights = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    d0, d1 = (f.product() for f in experts)
    expected = torch.stack([base(x[0]) + x[0] @ d0.T,
                            base(x[1]) + x[1] @ (0.25 * d0 + 0.75 * d1).T])
    assert torch.allclose(module(x), expected, atol=1e-5)
    assert module.lora_parameters() == 2 * 2 * (5 + 6)
    beams = torch.randn(4, 3, 5)  # 2 samples x 2 beams: each sample's weights repeat
    assert torch.allclose(module(beams)[1], base(beams[1]) + beams[1] @ d0.T, atol=1e-5)


def test_route_modules_copies_the_tree_and_checks_targets() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    experts = [{"0": factors(6, 5, 2, 1.0, s), "2": factors(3, 6, 2, 1.0, s + 9)} for s in (1, 2)]
    routing = Routing()
    routed, parameters = route_modules(model, experts, routing)
    assert isinstance(model[0], torch.nn.Linear) and isinstance(routed[0], RoutedLoRALinear)
    assert routed[0].base.weight is model[0].weight
    assert parameters == 2 * 2 * (5 + 6) + 2 * 2 * (6 + 3)
    routing.weights = torch.tensor([[0.0, 1.0]])
    x = torch.randn(1, 5)
    hidden = torch.relu(model[0](x) + x @ experts[1]["0"].product().T)
    assert torch.allclose(routed(x), model[2](hidden) + hidden @ experts[1]["2"].product().T,
                          atol=1e-5)
    with pytest.raises(CLBenchError, match="expert 2 has LoRA on other modules"):
        route_modules(model, [experts[0], {"0": experts[1]["0"]}], routing)


def test_routing_counts_write_the_confusion_matrix(tmp_path) -> None:
    counts = RoutingCounts(["R", "A"])
    assert not counts
    counts.add("R", [0, 0, 1])
    counts.add("A", [1])
    counts.add("general", [0])
    accuracy = counts.write(tmp_path, 2)
    assert accuracy == {"R": pytest.approx(200 / 3), "A": 100.0, "general": None}
    rows = list(csv.reader((tmp_path / "routing" / "stage_2.csv").open()))
    assert rows == [["evaluated", "R", "A", "routing_accuracy"], ["R", "2", "1", "66.67"],
                    ["A", "0", "1", "100.00"], ["general", "1", "0", ""]]


def test_routed_module_mixes_whole_modules_per_row() -> None:
    experts = [torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)]
    routing = Routing()
    module = RoutedModule(experts, routing)
    routing.weights = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    x = torch.randn(3, 5, 4)  # e.g. three images' patch features
    want = torch.stack([experts[1](x[0]), experts[0](x[1]),
                        0.5 * experts[0](x[2]) + 0.5 * experts[1](x[2])])
    assert torch.allclose(module(x), want, atol=1e-6)


def test_stored_lora_files_round_trip_and_reserve_their_names(tmp_path) -> None:
    lora = {"layers.0.q_proj": factors(6, 5, 2, 2.0, 1)}
    path = save_lora_file(tmp_path / "e.safetensors", lora, {"token": torch.ones(3)}, {"k": "v"})
    loaded, tensors, meta = load_lora_file(path)
    assert torch.equal(loaded["layers.0.q_proj"].B, lora["layers.0.q_proj"].B)
    assert loaded["layers.0.q_proj"].scaling == 2.0 and meta == {"k": "v"}
    assert torch.equal(tensors["token"], torch.ones(3))
    with pytest.raises(CLBenchError, match="reserved"):
        save_lora_file(tmp_path / "f.safetensors", lora, {"lora::x": torch.ones(1)})
    with pytest.raises(CLBenchError, match="is missing"):
        load_lora_file(tmp_path / "none.safetensors")


def test_lora_factors_and_projector_weights_load_into_a_model(tiny_llava) -> None:
    from cl_bench.config import LoraSettings
    from cl_bench.models.deltas import stage_delta
    from cl_bench.models.llava import load_llava
    from cl_bench.models.lora import (
        add_lora,
        load_lora_factors,
        projector_weights,
        set_projector_weights,
    )

    model = add_lora(load_llava(tiny_llava).model, LoraSettings(rank=2, alpha=4.0))
    stored = {n: LoraFactors(torch.randn_like(f.B), torch.randn_like(f.A), f.scaling)
              for n, f in stage_delta(model, {}).lora.items()}
    load_lora_factors(model, stored)
    assert all(torch.equal(f.B, stored[n].B) for n, f in stage_delta(model, {}).lora.items())
    name = next(iter(stored))
    wrong = {name: LoraFactors(stored[name].B, stored[name].A, 9.0)}
    with pytest.raises(CLBenchError, match="another rank or scaling"):
        load_lora_factors(model, wrong)
    weights = {n: torch.zeros_like(t) for n, t in projector_weights(model).items()}
    set_projector_weights(model, weights)
    assert all(not t.any() for t in projector_weights(model).values())
    with pytest.raises(CLBenchError, match="do not match"):
        set_projector_weights(model, {"linear_9.weight": torch.zeros(1)})
