"""The ``eval.backend`` choice: refusals before any work, vLLM's prompts, and (``gpu``) vLLM's
predictions against the HF backend's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from PIL import Image

from cl_bench.config import EvalConfig, RunConfig
from cl_bench.errors import CLBenchError
from cl_bench.evaluation.backends import check_backend, vllm_prompt
from cl_bench.models.llava import encode_prompt, load_llava
from cl_bench.running.runner import run


def test_hf_passes_and_unknown_backends_are_named() -> None:
    check_backend(EvalConfig(), "finetune", routes=True)
    with pytest.raises(CLBenchError, match="eval.backend='vlm': expected one of hf, vllm"):
        check_backend(EvalConfig(backend="vlm"), "finetune", routes=False)


def test_vllm_refused_for_routing_methods_and_without_vllm(monkeypatch) -> None:
    with pytest.raises(CLBenchError, match="method hide_llava routes each sample"):
        check_backend(EvalConfig(backend="vllm"), "hide_llava", routes=True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CLBenchError, match=r"vLLM is not installed.*cl-bench\[vllm\]"):
        check_backend(EvalConfig(backend="vllm"), "finetune", routes=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(CLBenchError, match="under torchrun use eval.backend=hf"):
        check_backend(EvalConfig(backend="vllm"), "finetune", routes=False)


def test_run_refuses_a_routing_method_on_vllm_before_making_its_folder(tmp_path: Path) -> None:
    cfg = RunConfig(method="hide_llava", suite="ucit", out=str(tmp_path / "run"))
    cfg.eval.backend = "vllm"
    with pytest.raises(CLBenchError, match="capability routes"):
        run(cfg)
    assert not (tmp_path / "run").exists()


def test_vllm_prompt_has_one_placeholder_and_the_run_s_square_image(tiny_llava: Path) -> None:
    bundle = load_llava(tiny_llava)
    bundle.image_aspect_ratio = "pad"
    wide = Image.new("RGB", (40, 20), (200, 10, 10))
    prompt = vllm_prompt(bundle, "What colour?", wide)
    expanded = encode_prompt(bundle, "What colour?", True)
    ids = prompt["prompt_token_ids"]
    assert ids.count(bundle.image_token_id) == 1
    assert len(ids) == len(expanded) - bundle.image_token_count + 1
    assert prompt["multi_modal_data"]["image"].size == (40, 40)
    assert vllm_prompt(bundle, "What colour?", None) == {
        "prompt_token_ids": encode_prompt(bundle, "What colour?", False)}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None,
                    reason="needs CUDA and vLLM")
def test_vllm_answers_match_hf_greedy(tmp_path: Path) -> None:
    """Tolerance: at least 90 % identical answers. HF (sdpa) and vLLM use other bf16 kernels, and
    a random-weight model's near-tied logits can flip a greedy choice."""
    from conftest import llama_tokenizer
    from test_gpu_smoke import llava_7b, write_models

    from cl_bench.config import ModelConfig
    from cl_bench.evaluation.backends import VllmGenerator
    from cl_bench.evaluation.generation import generate_texts

    tokenizer = llama_tokenizer()
    model_dir, _ = write_models(llava_7b(tokenizer), tokenizer, tmp_path)
    bundle = load_llava(model_dir, ModelConfig(device="cuda", dtype="bf16"))
    colours = [(230, 40, 40), (40, 200, 60), (50, 80, 230), (20, 20, 20)]
    prompts = [(f"What colour is the square? {i}", Image.new("RGB", (336, 300), colours[i % 4]))
               for i in range(16)] + [("Answer with one word.", None)] * 2
    hf = generate_texts(bundle.model, bundle, prompts, 8, 12)
    engine = VllmGenerator(bundle.model, bundle, tmp_path / "export", seed=0)
    try:
        served = engine.generate(prompts, 12)
    finally:
        engine.close()
    same = sum(a == b for a, b in zip(hf, served, strict=True))
    assert same >= 0.9 * len(prompts), list(zip(hf, served, strict=True))
