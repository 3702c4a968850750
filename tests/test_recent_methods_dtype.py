"""DISCO, SEFE, MR-LoRA and Model Tailor on a bf16 model (on the GPU where there is one): their
hooks keep the model's dtype and device, and the evaluated model generates."""

from __future__ import annotations

import pytest
import torch
from method_helpers import make_context, stage, trained_like

from cl_bench.config import ModelConfig
from cl_bench.evaluation.generation import generate_answers
from cl_bench.models.llava import load_llava
from methods.disco import Disco, DiscoOptions
from methods.model_tailor.method import ModelTailor, ModelTailorOptions
from methods.mr_lora.method import MRLoRA, MRLoRAOptions
from methods.sefe.method import Sefe, SefeOptions
from tasks.loaders import load_samples

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def bf16_context(name: str, tiny_llava, ucit_root, tmp_path):
    ctx = make_context(name, tiny_llava, ucit_root, tmp_path)
    ctx.bundle = load_llava(tiny_llava, ModelConfig(device="cpu", dtype="bf16"))
    ctx.bundle.model.to(DEVICE)
    return ctx


@pytest.mark.parametrize("name", ["disco", "sefe", "mr_lora", "model_tailor"])
def test_hooks_keep_dtype_and_device(name, tiny_llava, ucit_root, tiny_clip, tmp_path) -> None:
    ctx = bf16_context(name, tiny_llava, ucit_root, tmp_path)
    method = {
        "disco": lambda: Disco(DiscoOptions(encoder=str(tiny_clip)), ctx),
        "sefe": lambda: Sefe(SefeOptions(asd=False), ctx),
        "mr_lora": lambda: MRLoRA(MRLoRAOptions(router_epochs=1.0), ctx),
        "model_tailor": lambda: ModelTailor(ModelTailorOptions(calibration_samples=2), ctx),
    }[name]()
    model = ctx.bundle.model
    dtypes = {n: p.dtype for n, p in model.named_parameters()}  # bf16, the projector fp32
    assert torch.bfloat16 in dtypes.values()
    for index, task in enumerate(["ImageNet-R", "ArxivQA"], start=1):
        model = method.before_stage(model, stage(index, task))
        trained_like(model, index)
        if name == "sefe" and index == 2:
            penalty = method.extra_losses(model, {}, None)["reglora"]
            assert penalty.device.type == DEVICE and penalty.requires_grad
        model = method.after_stage(model, stage(index, task))
    assert {n: p.dtype for n, p in model.named_parameters() if n in dtypes} == dtypes
    assert {p.device.type for p in model.parameters()} == {DEVICE}
    evaluated = method.eval_model(model)
    folder = ucit_root / "UCIT" / "ArxivQA"
    samples = load_samples(folder / "test.json", ucit_root / "UCIT" / "datasets")[:2]
    hook = lambda prompts: method.before_generate(evaluated, prompts, "ArxivQA")  # noqa: E731
    answers = generate_answers(evaluated, ctx.bundle, samples, 2, 3, "ArxivQA", hook)
    assert set(answers) == {s.id for s in samples}
    kept = {n: p.dtype for n, p in evaluated.named_parameters() if n in dtypes}
    assert kept == {n: t for n, t in dtypes.items() if n in kept}
