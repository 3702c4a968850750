"""L2P: top-N selection and surrogate loss (eq. 3, 5), a frozen LLaVA, per-sample prompts."""

from __future__ import annotations

import math

import pytest
import torch
from method_kit import (
    answers_in_batches,
    make_context,
    model_settings,
    quick_argv,
    run_and_resume,
    stage,
    train_stage,
)
from PIL import Image
from safetensors import safe_open

from cl_bench.cli import main
from cl_bench.errors import CLBenchError
from cl_bench.method import parse_options
from cl_bench.models.batching import collate_batch, prompt_item
from cl_bench.models.checkpoint import MODEL_FILE
from cl_bench.models.llava import load_llava
from methods.l2p import L2P, L2POptions, PromptPool, key_loss, select_prompts

HALF = 1 / math.sqrt(2)


def test_top_n_selection_and_surrogate_loss_on_three_keys() -> None:  # L2P eq. 3, 5
    keys = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    queries = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    index, sims = select_prompts(queries, keys, top_n=2)
    # cosines: row 0 (1, 0, 1/sqrt2); row 1 (0, 1, 1/sqrt2); row 2 (-1, 0, -1/sqrt2)
    assert index.tolist() == [[0, 2], [1, 2], [1, 2]]
    assert torch.allclose(sims, torch.tensor([[1, HALF], [1, HALF], [0, -HALF]]), atol=1e-6)
    # sum_i (1 - cos) per row: 1 - 1/sqrt2, 1 - 1/sqrt2, 1 + (1 + 1/sqrt2); row 2 has no query
    present = torch.tensor([True, True, False])
    assert torch.isclose(key_loss(sims, present), torch.tensor(1 - HALF), atol=1e-6)
    assert torch.isclose(key_loss(sims, torch.ones(3, dtype=torch.bool)),
                         torch.tensor((2 * (1 - HALF) + 2 + HALF) / 3), atol=1e-6)


def test_the_pool_concatenates_the_selected_prompts_nearest_first() -> None:  # L2P eq. 2
    prompts = torch.arange(3 * 2 * 1, dtype=torch.float).view(3, 2, 1)  # 3 prompts of 2 tokens
    pool = PromptPool(prompts, torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]), top_n=2)
    pool.set_queries(torch.tensor([[0.0, 1.0]]), torch.tensor([True]))
    out = pool(1)
    assert out.embeds[0, :, 0].tolist() == [2.0, 3.0, 4.0, 5.0]  # P_1 then P_2 (eq. 2)
    assert out.used.tolist() == [True]
    with pytest.raises(CLBenchError, match="queries are not set for this batch"):
        pool(2)


@pytest.mark.parametrize(("given", "match"), [
    ({"pool_size": 4, "top_n": 5}, "need 1 <= top_n <= pool_size"),
    ({"top_n": 0}, "need 1 <= top_n <= pool_size"),
    ({"prompt_length": 0}, "prompt_length=0"),
    ({"key_weight": -0.1}, "key_weight=-0.1"),
])
def test_bad_options_are_clear_errors(given, match) -> None:
    with pytest.raises(CLBenchError, match=match):
        parse_options(L2P, given)


def test_bad_options_stop_a_run_before_its_folder(ucit_root, tiny_llava, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(quick_argv("l2p", ucit_root, tiny_llava, out, "method.top_n=20")) == 2
    assert "top_n <= pool_size" in capsys.readouterr().err and not out.exists()


def test_training_moves_only_prompts_and_keys(tiny_llava, ucit_root, tmp_path) -> None:
    ctx = make_context("l2p", tiny_llava, ucit_root, tmp_path, real_training=True)
    method = L2P(L2POptions(pool_size=6, top_n=2, prompt_length=3), ctx)
    model = ctx.bundle.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, info = train_stage(method, model, 1, "ImageNet-R")
    pool_start = (method.pool.prompts.detach().clone(), method.pool.keys.detach().clone())
    model, info = train_stage(method, model, 2, "ArxivQA")
    assert info["l2p_keys"] > 0
    assert dict(model.named_parameters()).keys() == before.keys()  # the pool was detached
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # bit for bit
    assert not torch.equal(pool_start[0], method.pool.prompts)
    assert not torch.equal(pool_start[1], method.pool.keys)
    assert method.pool.prompts.dtype == torch.float32


def colour(rgb) -> Image.Image:
    return Image.new("RGB", (32, 32), rgb)


def test_different_inputs_select_different_prompts(tiny_llava, ucit_root, tmp_path) -> None:
    ctx = make_context("l2p", tiny_llava, ucit_root, tmp_path, real_training=True)
    method = L2P(L2POptions(pool_size=4, top_n=2, prompt_length=2, key_weight=0.5), ctx)
    model = method.before_stage(ctx.bundle.model, stage(1, "ImageNet-R"))
    red, blue = colour((230, 20, 20)), colour((20, 20, 230))
    method.before_train_batch(model, [("q", red), ("q", blue)])
    queries = method.pool.queries.clone()
    with torch.no_grad():  # keys 0 and 2 placed at the two queries, the others opposite
        method.pool.keys.copy_(torch.stack([queries[0], -queries[0], queries[1], -queries[1]]))
    method.before_train_batch(model, [("q", red), ("q", blue), ("q", None)])
    out = method.pool(3)
    assert method.pool.selected[:2, 0].tolist() == [0, 2]
    prompts = method.pool.prompts
    assert torch.equal(out.embeds[0, :2], prompts[0]) and torch.equal(out.embeds[1, :2], prompts[2])
    assert out.used.tolist() == [True, True, False]  # no image, no query: no prompt
    # eq. 5: each image row's nearest key is its own query (distance 0), the second one is at
    # distance 1 - |cos(q_red, q_blue)|; the text-only row has no query and no term
    c = torch.nn.functional.cosine_similarity(queries[0], queries[1], dim=0).abs()
    term = method.extra_losses(model, {}, None)["l2p_keys"]
    assert torch.isclose(term, 0.5 * (1 - c), atol=1e-5)


def test_batched_answers_equal_one_at_a_time(tiny_llava, ucit_root, tmp_path) -> None:
    ctx = make_context("l2p", tiny_llava, ucit_root, tmp_path, real_training=True)
    method = L2P(L2POptions(pool_size=6, top_n=2, prompt_length=3), ctx)
    model, _ = train_stage(method, ctx.bundle.model, 1, "ImageNet-R")
    evaluated = method.eval_model(model)
    batched = answers_in_batches(method, evaluated, "ArxivQA", 3)
    assert batched == answers_in_batches(method, evaluated, "ArxivQA", 1)
    usage = method.after_evaluation(None)["prompt_usage"]["ArxivQA"]
    assert sum(usage) == 2 * 2 * len(batched)  # 2 passes, 2 prompts a sample
    assert not hasattr(model, "input_prompts")  # evaluation used a copy


@pytest.mark.slow
def test_quick_run_resumes_and_leaves_the_language_model_unchanged(
    ucit_root, tiny_llava, tmp_path, monkeypatch
) -> None:
    whole, _ = run_and_resume("l2p", ucit_root, tiny_llava, tmp_path, monkeypatch)
    checkpoint = whole / "checkpoints" / "stage_2"
    assert (checkpoint / "l2p_pool.safetensors").is_file()
    with safe_open(str(checkpoint / MODEL_FILE), "pt") as f:
        assert not list(f.keys())  # no update and no trained parameter of the LLaVA


def test_queries_and_prompts_on_a_bf16_model(tiny_llava, ucit_root, tmp_path) -> None:
    ctx = make_context("l2p", tiny_llava, ucit_root, tmp_path, real_training=True)
    model = load_llava(tiny_llava, model_settings("bf16")).model
    method = L2P(L2POptions(pool_size=4, top_n=2, prompt_length=2), ctx)
    model = method.before_stage(model, stage(1, "ImageNet-R"))
    item = prompt_item(ctx.bundle, "q", colour((230, 20, 20)))
    method.before_train_batch(model, [("q", item["image"])])
    batch = collate_batch([item], ctx.bundle)
    loss = model(**batch, labels=batch["input_ids"]).loss + method.extra_losses(model, {}, None)[
        "l2p_keys"]
    loss.backward()
    assert method.pool.prompts.dtype == torch.float32 and method.pool.prompts.grad is not None
    assert method.pool.keys.grad.abs().sum() > 0
