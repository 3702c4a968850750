"""CL-MoE: the expert statistics and the momentum update by hand, and both inside real training
stages of the tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from method_kit import make_context, planned, stage, train_stage

from cl_bench.errors import CLBenchError
from cl_bench.method import parse_options
from cl_bench.models.moe_lora import expert_layers
from cl_bench.running.training import train_model
from methods.cl_moe import (
    CLMoE,
    CLMoEOptions,
    CountingMoELoRALinear,
    expert_momenta,
    momentum_update,
    task_index,
    top_two_counts,
)


# -- statistics and momentum by hand ------------------------------------------------------------
def test_top_two_counts_skip_a_token_whose_two_best_experts_tie() -> None:
    gates = torch.tensor([[[0.5, 0.3, 0.2], [0.4, 0.4, 0.2]], [[0.1, 0.2, 0.7], [0.2, 0.2, 0.6]]])
    # tokens: {0, 1}; tie 0.4 = 0.4: none; {2, 1}; {2, 0 or 1}: 0.6 > 0.2, counted
    counts = top_two_counts(gates)
    assert counts[2] == 2 and counts.sum() == 6 and counts[0] + counts[1] == 4
    assert top_two_counts(gates[:, :1]).tolist() == [1, 2, 1]  # the first tokens: {0, 1}, {2, 1}


def test_task_index_keeps_the_most_counted_experts_never_an_unused_one() -> None:
    counts = torch.tensor([5, 0, 9, 5])
    assert task_index(counts, 2) == [2, 0]  # 9, then the tie 5 = 5 by expert number
    assert task_index(counts, 8) == [2, 0, 3]  # the release's 8: every expert used at all


def test_momentum_keeps_more_of_the_old_factors_except_for_experts_the_new_task_dropped() -> None:
    base = torch.nn.Linear(2, 2)
    layer = CountingMoELoRALinear(base, experts=2, rank=2, scaling=1.0, dropout=0.0,
                                  counts=torch.zeros(2, dtype=torch.long))
    with torch.no_grad():  # phi_t, trained: expert 0 is A row 0 / B column 0, expert 1 row 1
        layer.A.copy_(torch.tensor([[3.0, 3.0], [4.0, 4.0]]))
        layer.B.copy_(torch.tensor([[10.0, 20.0], [10.0, 20.0]]))
    old_a = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    old_b = torch.tensor([[0.0, 10.0], [0.0, 10.0]])
    lam = expert_momenta(2, previous=[0, 1], current=[1], momentum=0.7)
    assert lam.tolist() == pytest.approx([0.3, 0.7])  # expert 0: only the previous task's
    momentum_update(layer, (old_a, old_b), lam)
    # expert 0: 0.3 * 1 + 0.7 * 3 = 2.4, B: 0.3 * 0 + 0.7 * 10 = 7
    # expert 1: 0.7 * 2 + 0.3 * 4 = 2.6, B: 0.7 * 10 + 0.3 * 20 = 13
    assert torch.allclose(layer.A, torch.tensor([[2.4, 2.4], [2.6, 2.6]]))
    assert torch.allclose(layer.B, torch.tensor([[7.0, 13.0], [7.0, 13.0]]))


def test_the_layer_counts_only_while_training() -> None:
    counts = torch.zeros(3, dtype=torch.long)
    layer = CountingMoELoRALinear(torch.nn.Linear(4, 4), 3, 3, 1.0, 0.0, counts)
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    layer.train()(x)
    assert counts.sum() == 2 * 10  # two experts for each of the 10 tokens (no exact ties)
    layer.eval()(x)
    assert counts.sum() == 20


# -- in the model --------------------------------------------------------------------------------
def test_two_stages_index_their_experts_and_mix_them_by_momentum(
    tiny_llava, ucit_root, tmp_path
) -> None:
    ctx = make_context("cl_moe", tiny_llava, ucit_root, tmp_path, real_training=True)
    method = planned(CLMoE(CLMoEOptions(index_size=1), ctx))
    model, _ = train_stage(method, ctx.bundle.model, 1, "ImageNet-R")
    first = method.indices[0]
    assert len(first) == 1 and method.counts.sum() > 0
    snapshot = {n: (m.A.detach().clone(), m.B.detach().clone())
                for n, m in expert_layers(model).items()}
    model = method.before_stage(model, stage(2, "ArxivQA"))
    train_model(model, ctx.bundle, method.training_samples(stage(2, "ArxivQA")),
                ctx.config.train, tmp_path / "trainer", 2)
    trained = {n: (m.A.detach().clone(), m.B.detach().clone())
               for n, m in expert_layers(model).items()}
    model = method.after_stage(model, stage(2, "ArxivQA"))
    lam = expert_momenta(method.experts, first, method.indices[1], 0.7)
    rank = next(iter(expert_layers(model).values())).expert_rank
    per_rank = lam.float().repeat_interleave(rank)
    for name, layer in expert_layers(model).items():
        (a0, b0), (a1, b1) = snapshot[name], trained[name]
        assert torch.allclose(layer.A, per_rank[:, None] * a0 + (1 - per_rank[:, None]) * a1)
        assert torch.allclose(layer.B, b0 * per_rank + b1 * (1 - per_rank))
    assert not torch.allclose(layer.B, b1)  # the momentum changed what training left
    again = planned(CLMoE(CLMoEOptions(index_size=1), ctx))
    again.load_state(json.loads(json.dumps(method.state())))
    assert again.indices == method.indices and torch.equal(again.counts, method.counts.cpu())


def test_bad_options_are_errors() -> None:
    with pytest.raises(CLBenchError, match="momentum"):
        parse_options(CLMoE, {"momentum": "1.5"})
    with pytest.raises(CLBenchError, match="index_size"):
        CLMoEOptions(index_size=0)
    with pytest.raises(CLBenchError, match="divisible"):
        CLMoEOptions(experts=4, rank=6)
