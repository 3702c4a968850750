"""SMoLoRA: the separable routes and the fusion by hand, per sample, and the options."""

from __future__ import annotations

import pytest
import torch
from method_kit import make_context, planned
from method_matrix import build_method, eval_logits, sample_prompts, two_stages

from cl_bench.errors import CLBenchError
from cl_bench.method import parse_options
from cl_bench.models.moe_lora import SampleInputs, sequence_mean
from methods.smolora import SMoLoRA, SMoLoRALinear, fuse, top1


def test_the_fusion_weighs_each_half_by_a_softmax_over_its_own_score() -> None:
    vu, follow = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    w_vu, w_if = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    # scores 1 and 2: softmax (0.2689, 0.7311); 0.2689 [1, 0] + 0.7311 [0, 2]
    assert fuse(vu, follow, w_vu, w_if).tolist()[0] == pytest.approx([0.268941, 1.462117],
                                                                       abs=1e-5)


def test_the_visual_route_reads_the_mean_of_the_attended_positions() -> None:
    x = torch.tensor([[[1.0], [3.0], [100.0]], [[4.0], [6.0], [8.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert sequence_mean(x, mask).flatten().tolist() == [2.0, 6.0]
    assert sequence_mean(x[:, :1], mask).flatten().tolist() == [1.0, 4.0]  # a decoding step
    with pytest.raises(CLBenchError, match="attention mask"):
        sequence_mean(x[:, :2], mask)
    assert top1(torch.tensor([[0.1, 0.7, 0.2]])).tolist() == [[0.0, 1.0, 0.0]]


def hand_layer(inputs: SampleInputs) -> SMoLoRALinear:
    """E = 4 experts of rank 1 (VU: 0, 1; IF: 2, 3; B_e column e) on a zero base, scaling 1."""
    base = torch.nn.Linear(2, 2, bias=False)
    torch.nn.init.zeros_(base.weight)
    layer = SMoLoRALinear(base, experts=4, rank=4, scaling=1.0, dropout=0.0, inputs=inputs,
                          instruction_dim=2)
    with torch.no_grad():
        layer.A.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]]))
        layer.B.copy_(torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, 3.0]]))
        layer.vu_router.copy_(torch.eye(2))
        layer.if_router.copy_(torch.eye(2))
        layer.w_vu.copy_(torch.tensor([[1.0, 0.0]]))
        layer.w_if.copy_(torch.tensor([[0.0, 1.0]]))
    return layer


def test_each_sample_takes_its_own_visual_and_instruction_expert() -> None:
    inputs = SampleInputs()
    inputs.features = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # IF experts 3 and 2
    layer = hand_layer(inputs)
    x = torch.tensor([[[2.0, 1.0]], [[1.0, 3.0]]])  # VU experts 0 and 1
    # sample 1: A x = (2, 1, 3, 1); vu = B_0 2 = (2, 0), if = B_3 1 = (0, 3); scores 2, 3:
    #   softmax (0.2689, 0.7311): (0.5379, 2.1932)
    # sample 2: A x = (1, 3, 4, -2); vu = B_1 3 = (0, 3), if = B_2 4 = (8, 0); scores 0, 0:
    #   (4, 1.5)
    out = layer(x)
    assert out[0, 0].tolist() == pytest.approx([0.537883, 2.193176], abs=1e-5)
    assert out[1, 0].tolist() == pytest.approx([4.0, 1.5])
    assert layer.routes(x).tolist() == [[1, 0, 0, 1], [0, 1, 1, 0]]


def test_the_routers_stay_fixed_while_experts_and_fusion_scores_learn() -> None:
    inputs = SampleInputs()
    inputs.features = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    layer = hand_layer(inputs)
    layer(torch.tensor([[[2.0, 1.0]], [[1.0, 3.0]]])).sum().backward()
    assert {n for n, p in layer.named_parameters() if p.grad is not None} >= {"A", "B", "w_vu",
                                                                                "w_if"}
    assert {"vu_router", "if_router"} <= set(dict(layer.named_buffers()))


def test_beams_repeat_each_samples_instruction_and_a_missing_one_is_an_error() -> None:
    inputs = SampleInputs()
    with pytest.raises(CLBenchError, match="before_train_batch"):
        inputs.features_for(2)
    inputs.features = torch.tensor([[1.0], [2.0]])
    assert inputs.features_for(4).flatten().tolist() == [1.0, 1.0, 2.0, 2.0]
    with pytest.raises(CLBenchError, match="3 rows"):
        inputs.features_for(3)


def test_the_defaults_are_the_releases(tiny_llava, ucit_root, tiny_clip, tmp_path) -> None:
    ctx = make_context("smolora", tiny_llava, ucit_root, tmp_path, real_training=True)
    method = planned(SMoLoRA(parse_options(SMoLoRA, {"encoder": str(tiny_clip)}), ctx))
    # Train_Eval/*.sh: --expert_num 8 --lora_r 128 --lora_alpha 256
    assert (method.experts, method.rank, method.scaling) == (8, 128, 2.0)


@pytest.mark.parametrize(("given", "message"), [
    ({"experts": 3}, "must be even"),
    ({"experts": 4, "rank": 6}, "not divisible"),
    ({"text_feature": "mean"}, "text_feature"),
])
def test_bad_options_stop_before_training(given: dict, message: str) -> None:
    with pytest.raises(CLBenchError, match=message):
        parse_options(SMoLoRA, given)


def test_the_routers_read_each_forwards_mask_and_each_questions_feature(
    tiny_llava, ucit_root, tiny_clip, tmp_path
) -> None:
    method = build_method("smolora", tiny_llava, ucit_root, tiny_clip, tmp_path)
    model = two_stages(method, train=False)
    samples = sample_prompts(method)
    eval_logits(method, model, samples)
    assert method.inputs.mask.shape[0] == 2 and method.inputs.mask.sum() > 0
    want = method.encoder.text_features([s.question for s in samples])
    assert torch.equal(method.inputs.features, want)
