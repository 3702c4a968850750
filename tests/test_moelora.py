"""MoELoRA (CoIN): token-routed LoRA experts, hand-computed on a toy layer and in the model."""

from __future__ import annotations

import math

import pytest
import torch
from method_kit import (
    make_context,
    planned,
    quick_argv,
    run_and_resume,
    train_stage,
)

from cl_bench.cli import main
from cl_bench.errors import CLBenchError
from cl_bench.method import parse_options
from cl_bench.models.batching import collate_batch, prompt_item
from cl_bench.models.checkpoint import MODEL_FILE
from cl_bench.models.moe_lora import MoELoRALinear, expert_layers, without_experts
from methods.moelora import MoELoRA, MoELoRAOptions


def toy_layer(scaling: float = 2.0) -> MoELoRALinear:
    """2 -> 2 zero base, 2 experts of rank 1: A_1 = (1, 0), A_2 = (0, 1); B_1 = (1, 0)^T,
    B_2 = (0, 2)^T; router rows (1, 0) and (0, 1)."""
    base = torch.nn.Linear(2, 2)
    with torch.no_grad():
        base.weight.zero_()
        base.bias.zero_()
    layer = MoELoRALinear(base, experts=2, rank=2, scaling=scaling, dropout=0.0)
    with torch.no_grad():
        layer.A.copy_(torch.eye(2))
        layer.B.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        layer.router.copy_(torch.eye(2))
    return layer


def test_routed_output_of_a_two_expert_layer_by_hand() -> None:  # CoIN MoELoRA
    layer = toy_layer(scaling=2.0)
    x = torch.tensor([[[1.0, 2.0], [3.0, 0.0]]])  # one sequence of two tokens
    # token 1: g = softmax(1, 2) = (1/(1+e), e/(1+e)); A_1 x = 1, A_2 x = 2
    #   delta = 2 * (g_1 * 1 * (1, 0) + g_2 * 2 * (0, 2)) = (2 g_1, 8 g_2)
    # token 2: g = softmax(3, 0) = (e^3/(1+e^3), 1/(1+e^3)); A_1 x = 3, A_2 x = 0: (6 g_1, 0)
    e = math.e
    g1 = (1 / (1 + e), e / (1 + e))
    g2 = (e**3 / (1 + e**3), 1 / (1 + e**3))
    expected = torch.tensor([[[2 * g1[0], 8 * g1[1]], [6 * g2[0], 0.0]]])
    assert torch.allclose(layer(x), expected, atol=1e-6)
    gates = layer.gates(x)
    assert torch.allclose(gates[0, 0], torch.tensor(g1), atol=1e-6)
    assert torch.allclose(gates.sum(-1), torch.ones(1, 2))


def test_a_fresh_layer_is_the_base_and_keeps_fp32_adapters_on_a_bf16_base() -> None:
    base = torch.nn.Linear(8, 6).to(torch.bfloat16)
    layer = MoELoRALinear(base, experts=4, rank=8, scaling=2.0, dropout=0.1)
    x = torch.randn(3, 5, 8, dtype=torch.bfloat16)
    out = layer.eval()(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, base(x))  # B = 0 at the start
    assert {p.dtype for p in (layer.A, layer.B, layer.router)} == {torch.float32}
    assert layer.A.shape == (8, 8) and layer.B.shape == (6, 8) and layer.router.shape == (4, 8)


@pytest.mark.parametrize(("given", "match"), [
    ({"experts": 4, "rank": 6}, "rank=6 is not divisible by 4 experts"),
    ({"experts": 0}, "experts=0"),
    ({"rank": -2}, "rank=-2"),
    ({"alpha": 0}, "alpha=0"),
])
def test_bad_options_are_clear_errors(given, match) -> None:
    with pytest.raises(CLBenchError, match=match):
        parse_options(MoELoRA, given)


def test_experts_default_to_the_number_of_stages(tiny_llava, ucit_root, tmp_path) -> None:
    ctx = make_context("moelora", tiny_llava, ucit_root, tmp_path, real_training=True)
    tasks = [ctx.suite.task(t) for t in ("ImageNet-R", "ArxivQA", "VizWiz-caption")]
    method = MoELoRA(MoELoRAOptions(), ctx)
    assert len(method.plan(tasks)) == 3 and (method.experts, method.rank) == (3, 9)
    with pytest.raises(CLBenchError, match="rank=4 is not divisible by 3 experts"):
        MoELoRA(MoELoRAOptions(rank=4), ctx).plan(tasks)


def test_bad_rank_stops_a_run_before_any_training(ucit_root, tiny_llava, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(quick_argv("moelora", ucit_root, tiny_llava, out, "method.rank=3")) == 2
    assert "rank=3 is not divisible by 2 experts" in capsys.readouterr().err
    assert not (out / "records.jsonl").exists()  # not even the starting model was evaluated


def test_in_the_model_gates_sum_to_one_and_the_delta_is_the_routed_sum(
    tiny_llava, ucit_root, tmp_path
) -> None:
    ctx = make_context("moelora", tiny_llava, ucit_root, tmp_path, real_training=True)
    method = planned(MoELoRA(MoELoRAOptions(rank=4, alpha=8.0), ctx))
    start = {n: p.detach().clone() for n, p in ctx.bundle.model.named_parameters()}
    model, _ = train_stage(method, ctx.bundle.model, 1, "ImageNet-R")
    layers = expert_layers(model)
    assert len(layers) == 7 * model.config.text_config.num_hidden_layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.rsplit(".", 1)[1] for n in trainable if "multi_modal_projector" not in n} == {
        "A", "B", "router"}
    for name, p in model.named_parameters():  # the base weights never move
        if name.endswith("base.weight"):
            assert torch.equal(p, start[name.replace(".base.", ".")])
    name, layer = next((n, m) for n, m in layers.items() if n.endswith("layers.1.mlp.down_proj"))
    assert layer.B.abs().sum() > 0 and layer.scaling == 2.0  # alpha / r = 8 / 4
    trained = layer.B.detach().clone()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # values far from the start, so that any mis-grouped expert shows
        for p in (layer.A, layer.B, layer.router):
            p.copy_(torch.randn(p.shape, generator=gen))
    seen = {}
    handle = layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    item = prompt_item(ctx.bundle, "What colour is the square?", None)
    model.eval()
    with torch.no_grad():
        model(**collate_batch([item], ctx.bundle))
    handle.remove()
    x = seen["x"][0]  # tokens x in
    gates = torch.softmax(x @ layer.router.T, dim=-1)
    assert torch.allclose(gates.sum(-1), torch.ones(len(x)))
    assert not torch.allclose(gates[0], gates[-1], atol=1e-4)  # routed per token
    experts = [(layer.A[2 * e : 2 * e + 2], layer.B[:, 2 * e : 2 * e + 2]) for e in range(2)]
    delta = sum(gates[:, e : e + 1] * (x @ A.T) @ B.T for e, (A, B) in enumerate(experts))
    assert delta.abs().mean() > 0.01
    assert torch.allclose(seen["out"][0] - layer.base(x), 2.0 * delta, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        layer.B.copy_(trained)
    model, _ = train_stage(method, model, 2, "ArxivQA")  # the same experts train on
    assert expert_layers(model) == layers and not torch.equal(layer.B, trained)


def test_checkpoints_hold_the_adapters_and_a_pointer_to_the_base(
    tiny_llava, ucit_root, tmp_path
) -> None:
    ctx = make_context("moelora", tiny_llava, ucit_root, tmp_path, real_training=True)
    method = planned(MoELoRA(MoELoRAOptions(), ctx))
    model, _ = train_stage(method, ctx.bundle.model, 1, "ImageNet-R")
    ctx.note_trainable(model)  # as the runner: the adapters are no plain trained parameters
    method.save(model, tmp_path / "checkpoint")
    weights = sum(p.stat().st_size for p in tiny_llava.glob("*.safetensors"))
    assert (tmp_path / "checkpoint" / MODEL_FILE).stat().st_size < weights / 2  # no model copy
    plain = without_experts(model)
    assert not expert_layers(plain) and expert_layers(model)  # the trained model stays wrapped
    fresh = planned(MoELoRA(MoELoRAOptions(), make_context("moelora", tiny_llava, ucit_root,
                                                           tmp_path, real_training=True)))
    loaded = fresh.load(tmp_path / "checkpoint")  # on a freshly loaded starting model
    batch = collate_batch([prompt_item(ctx.bundle, "red", None)], ctx.bundle)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
        assert not torch.allclose(plain(**batch).logits, loaded(**batch).logits, atol=1e-4)


@pytest.mark.slow
def test_quick_run_resumes_with_its_experts(ucit_root, tiny_llava, tmp_path, monkeypatch) -> None:
    whole, _ = run_and_resume("moelora", ucit_root, tiny_llava, tmp_path, monkeypatch)
    assert (whole / "checkpoints" / "stage_2" / "moelora.safetensors").is_file()
