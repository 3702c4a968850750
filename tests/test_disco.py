"""DISCO: SSA activation factors and DKO matching by hand, subspaces through the hooks, the routed
model's outputs, checkpoints, options, and an end-to-end run with resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from method_kit import make_context, run_and_resume, stage, trained_like

from cl_bench.errors import CLBenchError
from cl_bench.method import parse_options
from cl_bench.models.batching import collate_batch, prompt_item
from cl_bench.models.deltas import PEFT_PREFIX
from cl_bench.models.llava import load_image
from cl_bench.models.routed_lora import RoutedLoRALinear, anchor_similarity
from methods.disco import (
    Disco,
    DiscoOptions,
    activation_factors,
    matching_subspace,
    merged_token,
)
from tasks.loaders import load_samples


# -- the core terms by hand ----------------------------------------------------------------------
def test_subspace_activation_on_toy_text_features() -> None:  # DISCO SSA
    tokens = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # identity tokens of two subspaces
    features = torch.tensor([[4.0, 3.0], [0.0, -1.0]])  # instructions' text features
    sims = anchor_similarity(features, tokens)
    assert torch.allclose(sims, torch.tensor([[0.8, 0.6], [0.0, -1.0]]))
    alpha = activation_factors(sims, 0.05)
    # row 0: softmax((16, 12)) = (1 / (1 + e^-4), 1 / (1 + e^4)); row 1: softmax((0, -20))
    expected = torch.tensor([[1 / (1 + math.exp(-4)), 1 / (1 + math.exp(4))],
                             [1 / (1 + math.exp(-20)), 1 / (1 + math.exp(20))]])
    assert torch.allclose(alpha, expected, atol=1e-6)
    assert torch.allclose(activation_factors(sims, 1.0)[0],
                          torch.tensor([1 / (1 + math.exp(-0.2)), 1 / (1 + math.exp(0.2))]))


def test_identity_token_matching_and_aggregation() -> None:  # DISCO DKO
    tokens = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]
    new = torch.tensor([0.96, 0.28])  # unit norm: cosine 0.96 with the first, 0.28 with the other
    assert matching_subspace(new, tokens, 0.9) == 0
    assert matching_subspace(new, tokens, 0.97) is None
    assert matching_subspace(new, tokens, None) is None
    assert matching_subspace(torch.tensor([0.28, 0.96]), tokens, 0.9) == 1
    assert matching_subspace(new, [], 0.9) is None
    # sample-weighted mean: (3 * (1, 0) + 1 * (0, 1)) / 4
    assert torch.allclose(merged_token(tokens[0], 3, tokens[1], 1), torch.tensor([0.75, 0.25]))


# -- options -------------------------------------------------------------------------------------
def test_bad_options_are_clear_errors(tiny_llava, ucit_root, tmp_path, tiny_clip) -> None:
    ctx = make_context("disco", tiny_llava, ucit_root, tmp_path)
    for given, message in [
        ({"temperature": 0}, "method.temperature=0"),
        ({"threshold": 1.5}, "method.threshold=1.5"),
        ({"rank": 0}, "method.rank=0"),
        ({"token_samples": 0}, "method.token_samples=0"),
        ({"text_feature": "mean"}, "method.text_feature='mean'"),
    ]:
        with pytest.raises(CLBenchError, match=message):
            Disco(parse_options(Disco, {**given, "encoder": str(tiny_clip)}), ctx)
    with pytest.raises(CLBenchError, match="disco needs a feature encoder"):
        Disco(DiscoOptions(), ctx)  # the real ucit suite names no default encoder
    with pytest.raises(CLBenchError, match="unknown option"):
        parse_options(Disco, {"temprature": 0.1})


# -- through the hooks ---------------------------------------------------------------------------
def disco(tiny_llava, ucit_root, tmp_path, tiny_clip, **options) -> Disco:
    ctx = make_context("disco", tiny_llava, ucit_root, tmp_path)
    return Disco(DiscoOptions(encoder=str(tiny_clip), **options), ctx)


def train_stages(method: Disco, tasks: list[str]) -> torch.nn.Module:
    model = method.context.bundle.model
    for index, task in enumerate(tasks, start=1):
        model = method.before_stage(model, stage(index, task))
        trained_like(model, index)
        model = method.after_stage(model, stage(index, task))
    return model


def prompts_of(ucit_root, task: str, n: int = 2) -> list:
    folder = ucit_root / "UCIT" / task
    samples = load_samples(folder / "test.json", ucit_root / "UCIT" / "datasets")[:n]
    return [(s.question, load_image(s.image)) for s in samples]


def test_the_routed_model_is_the_activation_weighted_mixture(
    tiny_llava, ucit_root, tmp_path, tiny_clip
) -> None:
    method = disco(tiny_llava, ucit_root, tmp_path, tiny_clip, temperature=0.02)
    plain = train_stages(method, ["ImageNet-R", "ArxivQA"])
    assert [s.tasks for s in method.subspaces] == [["ImageNet-R"], ["ArxivQA"]]
    assert not any("lora" in n for n, _ in plain.named_parameters())
    routed = method.eval_model(plain)
    assert isinstance(routed.get_submodule("model.language_model.layers.0.mlp.up_proj"),
                      RoutedLoRALinear)
    prompts = prompts_of(ucit_root, "ImageNet-R", 1) + prompts_of(ucit_root, "ArxivQA", 1)
    method.before_generate(routed, prompts, "mixed")
    alpha = method.routing.weights
    features = method.encoder.text_features([q for q, _ in prompts])
    tokens = torch.stack([s.token for s in method.subspaces])
    assert torch.allclose(alpha, torch.softmax(anchor_similarity(features, tokens) / 0.02, -1))
    bundle = method.context.bundle
    batch = collate_batch([prompt_item(bundle, q, img) for q, img in prompts], bundle,
                          left_pad=True)
    with torch.no_grad():
        got = routed(**batch).logits
        for row in range(2):  # each sample: the base model + sum_i alpha_i * (its subspace i)
            mixed = _merged(plain, method, alpha[row])
            single = {k: v[row : row + 1] for k, v in batch.items()}
            assert torch.allclose(got[row], mixed(**single).logits[0], atol=1e-4)
        assert not torch.allclose(got[0], plain(**{k: v[:1] for k, v in batch.items()}).logits[0],
                                  atol=1e-3)


def _merged(plain: torch.nn.Module, method: Disco, alpha: torch.Tensor) -> torch.nn.Module:
    import copy

    model = copy.deepcopy(plain)
    with torch.no_grad():
        for name in method.subspaces[0].lora:
            weight = model.get_submodule(name).weight
            for a, subspace in zip(alpha.tolist(), method.subspaces, strict=True):
                weight += a * subspace.lora[name].product()
    return model


def test_a_matching_stage_continues_its_subspace(
    tiny_llava, ucit_root, tmp_path, tiny_clip
) -> None:
    method = disco(tiny_llava, ucit_root, tmp_path, tiny_clip, threshold=0.9)
    plain = train_stages(method, ["ImageNet-R"])
    first = method.subspaces[0]
    first_lora = {k: (f.A.clone(), f.B.clone()) for k, f in first.lora.items()}
    first_token = first.token.clone()
    again = stage(2, "ImageNet-R")  # the same instructions: cosine 1 with the stored token
    model = method.before_stage(plain, again)
    name = next(iter(first_lora))
    module = model.get_submodule(PEFT_PREFIX + name)
    assert torch.equal(module.lora_B["default"].weight, first_lora[name][1])  # continued
    trained_like(model, 7)
    method.after_stage(model, again)
    assert len(method.subspaces) == 1 and method.subspaces[0].tasks == ["ImageNet-R"] * 2
    assert method.subspaces[0].samples == 16
    assert torch.allclose(method.subspaces[0].token, first_token, atol=1e-6)  # mean of equals
    assert not torch.equal(method.subspaces[0].lora[name].B, first_lora[name][1])
    different = disco(tiny_llava, ucit_root, tmp_path / "b", tiny_clip, threshold=1.0)
    train_stages(different, ["ImageNet-R", "ArxivQA"])
    assert len(different.subspaces) == 2


def test_checkpoints_restore_the_subspaces(tiny_llava, ucit_root, tmp_path, tiny_clip) -> None:
    method = disco(tiny_llava, ucit_root, tmp_path, tiny_clip)
    plain = train_stages(method, ["ImageNet-R", "ArxivQA"])
    folder = tmp_path / "checkpoint"
    method.save(plain, folder)
    assert json.loads((folder / "method_state.json").read_text())["subspaces"][1] == {
        "tasks": ["ArxivQA"], "samples": 8}
    fresh = disco(tiny_llava, ucit_root, tmp_path, tiny_clip)
    fresh.load(folder)
    for a, b in zip(method.subspaces, fresh.subspaces, strict=True):
        assert a.tasks == b.tasks and torch.equal(a.token, b.token)
        assert all(torch.equal(a.lora[n].B, b.lora[n].B) for n in a.lora)
    (folder / "disco" / "subspace_0.safetensors").unlink()
    (folder / "disco" / "subspace_1.safetensors").unlink()
    with pytest.raises(CLBenchError, match="no DISCO subspace files"):
        disco(tiny_llava, ucit_root, tmp_path, tiny_clip).load(folder)


@pytest.mark.slow
def test_end_to_end_run_and_resume(tiny_llava, ucit_root, tiny_clip, tmp_path, monkeypatch):
    from reports.run_folder import read_records

    out, _ = run_and_resume("disco", ucit_root, tiny_llava, tmp_path, monkeypatch,
                            f"method.encoder={tiny_clip}")
    last = read_records(out)[-1]["method"]
    assert last["subspaces"] == 2 and last["parameters"]["identity_tokens"] == 2 * 24
    assert set(last["routing_accuracy"]) == {"ImageNet-R", "ArxivQA"}
    assert (out / "routing" / "stage_2.csv").is_file()
