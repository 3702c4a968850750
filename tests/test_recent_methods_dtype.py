"""DISCO, SEFE, MR-LoRA, Model Tailor and CL-MoE on a bf16 model (on the GPU where there is
one): their hooks keep the model's dtype and device, and the evaluated model generates."""

from __future__ import annotations

import pytest
import torch
from method_helpers import load_tiny, make_context, stage, trained_like

from cl_bench.evaluation.generation import generate_answers
from methods.cl_moe import CLMoE, CLMoEOptions
from methods.disco import Disco, DiscoOptions
from methods.model_tailor.method import ModelTailor, ModelTailorOptions
from methods.mr_lora.method import MRLoRA, MRLoRAOptions
from methods.sefe.method import Sefe, SefeOptions
from tasks.loaders import load_samples

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def bf16_context(name: str, tiny_llava, ucit_root, tmp_path):
    ctx = make_context(name, tiny_llava, ucit_root, tmp_path)
    ctx.bundle = load_tiny(tiny_llava, "bf16", DEVICE)
    return ctx


def frozen_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    """The dtypes of the base model's linear weights (the projector trains in fp32)."""
    return {m.weight.dtype for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "multi_modal_projector" not in name}


@pytest.mark.parametrize("name", ["disco", "sefe", "mr_lora", "model_tailor", "cl_moe"])
def test_hooks_keep_dtype_and_device(name, tiny_llava, ucit_root, tiny_clip, tmp_path) -> None:
    ctx = bf16_context(name, tiny_llava, ucit_root, tmp_path)
    method = {
        "disco": lambda: Disco(DiscoOptions(encoder=str(tiny_clip)), ctx),
        "sefe": lambda: Sefe(SefeOptions(asd=False), ctx),
        "mr_lora": lambda: MRLoRA(MRLoRAOptions(router_epochs=1.0), ctx),
        "model_tailor": lambda: ModelTailor(ModelTailorOptions(calibration_samples=2), ctx),
        "cl_moe": lambda: CLMoE(CLMoEOptions(experts=2), ctx),
    }[name]()
    method.plan([ctx.suite.task("ImageNet-R"), ctx.suite.task("ArxivQA")])
    model = ctx.bundle.model
    for index, task in enumerate(["ImageNet-R", "ArxivQA"], start=1):
        model = method.before_stage(model, stage(index, task))
        trained_like(model, index)
        if name == "sefe" and index == 2:
            penalty = method.extra_losses(model, {}, None)["reglora"]
            assert penalty.device.type == DEVICE and penalty.requires_grad
        model = method.after_stage(model, stage(index, task))
    assert frozen_dtypes(model) == {torch.bfloat16}  # updates and what trains: fp32 beside
    assert {p.device.type for p in model.parameters()} == {DEVICE}
    evaluated = method.eval_model(model)
    folder = ucit_root / "UCIT" / "ArxivQA"
    samples = load_samples(folder / "test.json", ucit_root / "UCIT" / "datasets")[:2]
    hook = lambda prompts: method.before_generate(evaluated, prompts, "ArxivQA")  # noqa: E731
    answers = generate_answers(evaluated, ctx.bundle, samples, 2, 3, "ArxivQA", hook)
    assert set(answers) == {s.id for s in samples}
    assert frozen_dtypes(evaluated) == {torch.bfloat16}
