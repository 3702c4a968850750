"""Per-sample mixtures of stored LoRA experts (shared by HiDe-LLaVA, DISCO, MR-LoRA) and the
routing confusion counts."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from cl_bench.errors import CLBenchError
from cl_bench.evaluation.routing_counts import RoutingCounts
from cl_bench.models.deltas import LoraFactors
from cl_bench.models.routed_lora import (
    RoutedLoRALinear,
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
