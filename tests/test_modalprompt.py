"""ModalPrompt: prototype guidance and selection, alignment loss, frozen LLaVA, prompts."""

from __future__ import annotations

import math

import pytest
import torch
from method_kit import (
    answers_in_batches,
    make_context,
    quick_argv,
    run_and_resume,
    train_stage,
)
from PIL import Image
from safetensors import safe_open

from cl_bench.cli import main
from cl_bench.errors import CLBenchError
from cl_bench.method import parse_options
from cl_bench.models.checkpoint import MODEL_FILE
from methods.modalprompt.method import ModalPrompt
from methods.modalprompt.options import ModalPromptOptions
from methods.modalprompt.prompts import (
    BatchFeatures,
    TaskPrompts,
    alignment_loss,
    guidance,
    nearest_last,
)


def features(image, text, has_image) -> BatchFeatures:
    return BatchFeatures(torch.tensor(image), torch.tensor(text), torch.tensor(has_image))


def test_guidance_on_toy_prototypes() -> None:
    protos = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    f = features([[0.6, 0.8], [0.0, 0.0]], [[3.0, 0.0], [0.0, 1.0]], [True, False])
    guide = guidance(f, protos, image_weight=0.5)
    # row 0: 0.5 cos(img) + 0.5 cos(txt) = (0.5*0.6 + 0.5, 0.5*0.8, 0.5*1.4/sqrt2 + 0.5/sqrt2)
    # row 1 has no image: cos(txt) alone: (0, 1, 1/sqrt2)
    s = 2 ** -0.5
    expected = torch.tensor([[0.8, 0.4, 0.5 * 1.4 * s + 0.5 * s], [0.0, 1.0, s]])
    assert torch.allclose(guide, expected, atol=1e-6)
    # the 2 nearest, least similar first (the best next to the text): row 0 (0.8, 0.4, 0.85)
    assert nearest_last(guide, 2).tolist() == [[0, 2], [2, 1]]
    image_only = guidance(f, protos, image_weight=1.0)
    assert torch.allclose(image_only[0], torch.tensor([0.6, 0.8, 1.4 * s]), atol=1e-6)


def test_a_prototype_is_the_mean_projected_prompt_token() -> None:
    prompts = TaskPrompts(hidden=2, feature_dim=2, top_k=1, image_weight=0.5)
    prompts.add_task("A", torch.tensor([[1.0, 0.0], [-1.0, 2.0]]))
    with torch.no_grad():
        for linear in (prompts.transforms[0][0], prompts.transforms[0][2]):
            linear.weight.copy_(torch.eye(2))
            linear.bias.zero_()

    def silu(v: float) -> float:
        return v / (1 + math.exp(-v))

    # mean over the two tokens of SiLU(token): ((silu(1) + silu(-1)) / 2, (silu(0) + silu(2)) / 2)
    expected = torch.tensor([(silu(1) + silu(-1)) / 2, (silu(0) + silu(2)) / 2])
    assert torch.allclose(prompts.prototypes()[0], expected, atol=1e-6)


def test_alignment_loss_by_hand() -> None:
    f = features([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], [[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]],
                 [True, True, False])
    # image: 1 - mean(cos) over the 2 image rows = 1 - (1 + 0)/2; text: 1 - (1 + 1 + 0)/3
    loss = alignment_loss(f, torch.tensor([3.0, 0.0]))
    assert torch.isclose(loss, torch.tensor(0.5 + 1 / 3), atol=1e-6)


def task_prompts(top_k: int) -> TaskPrompts:
    """Two tasks whose prototypes are exactly (1, 0) and (0, 1) (zero weights, bias = target)."""
    prompts = TaskPrompts(hidden=4, feature_dim=2, top_k=top_k, image_weight=0.5)
    for task, target in (("A", [1.0, 0.0]), ("B", [0.0, 1.0])):
        prompts.add_task(task, torch.randn(3, 4))
        with torch.no_grad():
            last = prompts.transforms[-1][-1]
            last.weight.zero_()
            last.bias.copy_(torch.tensor(target))
    return prompts


def test_a_sample_near_task_2s_prototype_gets_task_2s_prompt() -> None:
    prompts = task_prompts(top_k=1).eval()
    assert torch.allclose(prompts.prototypes(), torch.eye(2))
    prompts.set_features(features([[0.1, 0.9], [0.9, 0.2]], [[0.2, 1.0], [1.0, 0.0]],
                                  [True, True]))
    out = prompts(2)
    assert prompts.chosen.tolist() == [[1], [0]]
    assert torch.equal(out.embeds[0], prompts.prompts[1]) and out.used is None
    assert torch.equal(out.embeds[1], prompts.prompts[0])
    with pytest.raises(CLBenchError, match="features are not set for this batch"):
        prompts(3)


def test_training_inserts_the_nearest_earlier_prompts_then_the_current_one() -> None:
    prompts = task_prompts(top_k=2).train()
    assert [p.requires_grad for p in prompts.prompts] == [False, True]  # only the last trains
    prompts.set_features(features([[0.0, 1.0]], [[0.0, 1.0]], [True]))
    out = prompts(1)
    assert prompts.chosen.tolist() == [[0, 1]]  # the only earlier prompt, then task B's
    assert torch.equal(out.embeds[0], torch.cat([prompts.prompts[0], prompts.prompts[1]]))
    assert torch.isclose(prompts.alignment, torch.tensor(0.0), atol=1e-6)  # features at proto B


@pytest.mark.parametrize(("given", "match"), [
    ({"top_k": 0}, "top_k=0"),
    ({"prompt_length": 0}, "prompt_length=0"),
    ({"image_weight": 1.5}, "image_weight=1.5"),
    ({"text_feature": "mean"}, "text_feature='mean'"),
])
def test_bad_options_are_clear_errors(given, match) -> None:
    with pytest.raises(CLBenchError, match=match):
        parse_options(ModalPrompt, given)


def test_an_encoder_without_a_shared_feature_space_is_refused(tiny_llava, ucit_root,
                                                             tmp_path) -> None:
    ctx = make_context("modalprompt", tiny_llava, ucit_root, tmp_path, real_training=True)
    with pytest.raises(CLBenchError, match="64 text dims"):  # LLaVA's own towers: 32 vs 64
        ModalPrompt(ModalPromptOptions(encoder="llava"), ctx)
    with pytest.raises(CLBenchError, match="needs a feature encoder"):
        ModalPrompt(ModalPromptOptions(), ctx)  # the real ucit suite has no default encoder


def test_stages_train_only_the_current_prompt_and_leave_the_llava_unchanged(
    tiny_llava, ucit_root, tiny_clip, tmp_path
) -> None:
    ctx = make_context("modalprompt", tiny_llava, ucit_root, tmp_path, real_training=True)
    method = ModalPrompt(ModalPromptOptions(encoder=str(tiny_clip), prompt_length=4), ctx)
    model = ctx.bundle.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, _ = train_stage(method, model, 1, "ImageNet-R")
    first = {k: v.clone() for k, v in method.prompts.state().items()}
    model, info = train_stage(method, model, 2, "ArxivQA")
    assert info["modalprompt_alignment"] > 0 and method.prompts.tasks == ["ImageNet-R", "ArxivQA"]
    assert dict(model.named_parameters()).keys() == before.keys()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # bit for bit
    after = method.prompts.state()
    assert all(torch.equal(first[k], after[k]) for k in first)  # task 1 frozen in stage 2
    assert not torch.equal(after["prompts.1"], vocabulary_row_copy(after["prompts.1"], model))
    method.save(model, tmp_path / "checkpoint")
    fresh = ModalPrompt(ModalPromptOptions(encoder=str(tiny_clip), prompt_length=4), ctx)
    fresh.load(tmp_path / "checkpoint")
    assert fresh.prompts.tasks == ["ImageNet-R", "ArxivQA"]
    loaded = fresh.prompts.state()
    assert loaded.keys() == after.keys() and all(torch.equal(after[k], loaded[k]) for k in after)


def test_batch_features_are_each_rows_own(tiny_llava, ucit_root, tiny_clip, tmp_path) -> None:
    ctx = make_context("modalprompt", tiny_llava, ucit_root, tmp_path, real_training=True)
    method = ModalPrompt(ModalPromptOptions(encoder=str(tiny_clip)), ctx)
    red, blue = Image.new("RGB", (32, 32), (230, 20, 20)), Image.new("RGB", (32, 32), (20, 20, 230))
    got = method.features([("a red one", red), ("text only", None), ("a blue one", blue)])
    encoder = method.encoder
    assert got.has_image.tolist() == [True, False, True]
    assert torch.allclose(got.image[[0, 2]], encoder.image_features([red, blue]), atol=1e-5)
    assert torch.equal(got.image[1], torch.zeros_like(got.image[1]))
    texts = encoder.text_features(["a red one", "text only", "a blue one"])
    assert torch.allclose(got.text, texts, atol=1e-5)
    assert not torch.allclose(got.image[0], got.image[2], atol=1e-3)


def vocabulary_row_copy(prompt: torch.Tensor, model) -> torch.Tensor:
    """The vocabulary embedding each prompt token started from (its nearest row)."""
    table = model.get_input_embeddings().weight
    return table[torch.cdist(prompt, table).argmin(1)]


def test_batched_answers_equal_one_at_a_time(tiny_llava, ucit_root, tiny_clip, tmp_path) -> None:
    ctx = make_context("modalprompt", tiny_llava, ucit_root, tmp_path, real_training=True)
    method = ModalPrompt(ModalPromptOptions(encoder=str(tiny_clip), top_k=1), ctx)
    model = ctx.bundle.model
    for index, task in enumerate(["ImageNet-R", "ArxivQA"], start=1):
        model, _ = train_stage(method, model, index, task)
    evaluated = method.eval_model(model)
    batched = answers_in_batches(method, evaluated, "ArxivQA", 3)
    assert batched == answers_in_batches(method, evaluated, "ArxivQA", 1)
    info = method.after_evaluation(None)
    assert sum(info["selections"]["ArxivQA"]) == 2 * len(batched)
    assert set(info["selection_accuracy"]) == {"ArxivQA"}


@pytest.mark.slow
def test_quick_run_resumes_with_its_task_prompts(
    ucit_root, tiny_llava, tiny_clip, tmp_path, monkeypatch
) -> None:
    whole, _ = run_and_resume("modalprompt", ucit_root, tiny_llava, tmp_path, monkeypatch,
                              f"method.encoder={tiny_clip}")
    checkpoint = whole / "checkpoints" / "stage_2"
    assert (checkpoint / "modalprompt.safetensors").is_file()
    with safe_open(str(checkpoint / MODEL_FILE), "pt") as f:
        assert list(f.keys()) == []  # nothing in the LLaVA changed


def test_bad_options_stop_a_run_before_its_folder(ucit_root, tiny_llava, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(quick_argv("modalprompt", ucit_root, tiny_llava, out, "method.top_k=0")) == 2
    assert "top_k=0" in capsys.readouterr().err and not out.exists()
