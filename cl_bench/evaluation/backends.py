"""Generation backends of the task evaluation: ``hf`` (the live model, ``generation.py``) and
``vllm`` (the evaluated model exported as one merged checkpoint and served by vLLM).

vLLM serves one fixed set of weights to every prompt. A method that routes per sample
(capability ``routes``: a per-sample expert, prompt or LoRA chosen in ``before_generate``) has no
such checkpoint, so it is refused up front and stays on ``hf``. The vLLM path has never run in
this project's CI (no GPU there): ``tests/test_backends.py``'s ``gpu`` test compares it with hf.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from cl_bench.config import EvalConfig, RunConfig
from cl_bench.errors import CLBenchError
from cl_bench.evaluation.generation import Prompt, generate_answers, method_hook
from cl_bench.method import Method
from cl_bench.models.llava import ModelBundle, encode_prompt, load_image
from cl_bench.models.placement import compute_dtype
from cl_bench.models.updates import merged_state
from tasks.images import to_rgb
from tasks.loaders import Sample

BACKENDS = ("hf", "vllm")
VLLM_INSTALL = "pip install 'cl-bench[vllm]' (in an environment with a CUDA build of torch)"
VLLM_MEMORY = 0.4  # share of the GPU vLLM may take beside the training process's model


def check_backend(cfg: EvalConfig, method: str, routes: bool) -> None:
    """Refuse an unknown backend, and vllm for a routing method or without vLLM, before any
    work is done."""
    if cfg.backend not in BACKENDS:
        raise CLBenchError(f"eval.backend={cfg.backend!r}: expected one of {', '.join(BACKENDS)}")
    if cfg.backend != "vllm":
        return
    if routes:
        raise CLBenchError(
            f"eval.backend=vllm: method {method} routes each sample (capability routes: an "
            "expert, prompt or LoRA chosen per input), so its evaluated model is no single "
            "merged checkpoint vLLM could serve; use eval.backend=hf (docs/gpu.md)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CLBenchError("eval.backend=vllm runs in one process; under torchrun use "
                           "eval.backend=hf (sharded over the ranks)")
    if importlib.util.find_spec("vllm") is None:
        raise CLBenchError(f"eval.backend=vllm: vLLM is not installed. {VLLM_INSTALL}; "
                           "or use eval.backend=hf")


Answerer = Callable[[str, list[Sample]], dict[str, str]]


@contextmanager
def task_answerer(
    model: torch.nn.Module, bundle: ModelBundle, cfg: RunConfig, method: Method | None,
    run_dir: Path,
) -> Iterator[Answerer]:
    """``answer(label, samples) -> {id: prediction}`` on the run's backend: hf (batched, with
    the method's ``before_generate``, sharded over the ranks of a process group) or vllm (one
    engine for the stage's tasks, on a merged export in ``run_dir/vllm_model``, removed after)."""
    ev = cfg.eval
    if ev.backend != "vllm":
        yield lambda label, samples: generate_answers(
            model, bundle, samples, ev.batch_size, ev.max_new_tokens, label,
            method_hook(method, model, label), workers=ev.workers, sharded=True)
        return
    engine = VllmGenerator(model, bundle, run_dir / "vllm_model", cfg.seed)
    try:
        yield lambda label, samples: dict(zip(
            [s.id for s in samples],
            engine.generate([(s.question, s.image) for s in samples], ev.max_new_tokens),
            strict=True))
    finally:
        engine.close()


def vllm_prompt(bundle: ModelBundle, question: str, image: Path | object | None) -> dict:
    """A vLLM prompt: our template's token ids with one image placeholder (vLLM expands it)
    and the image as the run preprocesses it before resizing (padded to a square for ``pad``)."""
    ids = encode_prompt(bundle, question, image is not None)
    if image is None:
        return {"prompt_token_ids": ids}
    at = ids.index(bundle.image_token_id)
    ids = ids[: at + 1] + ids[at + bundle.image_token_count :]
    picture = load_image(image) if isinstance(image, Path) else to_rgb(image)
    if bundle.image_aspect_ratio == "pad":
        from cl_bench.models.backbones.llava import pad_to_square

        mean = bundle.processor.image_processor.image_mean
        picture = pad_to_square(picture, tuple(int(255 * m) for m in mean))
    return {"prompt_token_ids": ids, "multi_modal_data": {"image": picture}}


class VllmGenerator:
    """The evaluated model written to ``folder`` (updates merged in float32, then cast to the
    model's dtype) and served by a vLLM engine until ``close``."""

    def __init__(self, model: torch.nn.Module, bundle: ModelBundle, folder: Path, seed: int):
        from vllm import LLM

        self.bundle, self.folder = bundle, folder
        dtype = compute_dtype(model)
        shutil.rmtree(folder, ignore_errors=True)
        model.save_pretrained(folder, state_dict=merged_state(model, dtype))
        bundle.processor.save_pretrained(folder)
        self.llm = LLM(model=str(folder), dtype=str(dtype).removeprefix("torch."), seed=seed,
                       gpu_memory_utilization=VLLM_MEMORY, limit_mm_per_prompt={"image": 1})

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[str]:
        """Greedy answers in input order (vLLM schedules and batches them itself)."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens,
                                stop_token_ids=[self.bundle.tokenizer.eos_token_id])
        requests = [vllm_prompt(self.bundle, q, image) for q, image in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [out.outputs[0].text.strip() for out in outputs]

    def close(self) -> None:
        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        shutil.rmtree(self.folder, ignore_errors=True)
