"""cl-bench's lmms-eval model: the model as a method assembled it, answering lmms-eval requests.

Imported only when lmms-eval is installed (``cl_bench.evaluation.general`` checks first). It
wraps the live model (no copy) and answers ``generate_until`` through the harness's batched
greedy generation, with the LLaVA-1.5 prompt the tasks are scored with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image

from cl_bench.errors import CLBenchError
from cl_bench.evaluation.generation import BeforeBatch, generate_texts
from cl_bench.models.batching import collate_batch
from cl_bench.models.llava import ModelBundle, encode_prompt, load_image
from cl_bench.models.placement import to_model
from tasks.images import to_rgb

IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class Request:
    """A generation request reduced to what the LLaVA prompt needs."""

    text: str
    image: Image.Image | None
    max_new_tokens: int
    until: tuple[str, ...]


class ClBenchLMM(lmms):
    """An lmms-eval model over a live cl-bench model (greedy, one image per prompt)."""

    def __init__(
        self, model: torch.nn.Module, bundle: ModelBundle, batch_size: int, max_new_tokens: int,
        before_batch: BeforeBatch | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.bundle = bundle
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.before_batch = before_batch  # the method's hook (e.g. routing by input)

    # -- lmms-eval API ----------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        parsed = [self._request(req) for req in requests]
        groups: dict[int, list[int]] = {}
        for i, req in enumerate(parsed):
            groups.setdefault(req.max_new_tokens, []).append(i)
        answers = [""] * len(parsed)
        for max_new_tokens, indices in groups.items():
            prompts = [(parsed[i].text, parsed[i].image) for i in indices]
            texts = generate_texts(
                self.model, self.bundle, prompts, self.batch_size, max_new_tokens, "lmms-eval",
                self.before_batch,
            )
            for i, text in zip(indices, texts, strict=True):
                answers[i] = cut_at(text, parsed[i].until)
        return answers

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        self.model.eval()
        return [self._loglikelihood(req) for req in requests]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise CLBenchError("multi-round lmms-eval tasks are not supported by cl-bench's bridge")

    # -- helpers ----------------------------------------------------------------------------
    def _doc(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    def _request(self, req: Instance) -> Request:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args[:6]
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.get("until") or ()
        until = (until,) if isinstance(until, str) else tuple(until)
        image = first_image(doc_to_visual(self._doc(task, split, doc_id)), task)
        max_new = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
        return Request(prompt_text(context), image, max_new, until)

    def _loglikelihood(self, req: Instance) -> tuple[float, bool]:
        context, target, doc_to_visual, doc_id, task, split = req.args[:6]
        doc = self._doc(task, split, doc_id)
        continuation = target if isinstance(target, str) else target(doc)
        image = first_image(doc_to_visual(doc), task)
        question = prompt_text(context)
        if self.before_batch is not None:
            self.before_batch([(question, image)])
        prompt = encode_prompt(self.bundle, question, image is not None)
        cont = self.bundle.tokenizer(continuation, add_special_tokens=False).input_ids
        batch = to_model(collate_batch([{"ids": prompt + cont, "image": image}], self.bundle),
                         self.model)
        logits = self.model(**batch).logits[0, len(prompt) - 1 : -1].float()
        target_ids = torch.tensor(cont, device=logits.device)
        rows = torch.arange(len(cont), device=logits.device)
        logprob = torch.log_softmax(logits, dim=-1)[rows, target_ids]
        return float(logprob.sum()), bool((logits.argmax(-1) == target_ids).all())


def prompt_text(context: str) -> str:
    """The question without image placeholders (the LLaVA prompt puts the image first)."""
    return context.replace(IMAGE_PLACEHOLDER, "").strip()


def first_image(visuals, task: str) -> Image.Image | None:
    """The one image a LLaVA-1.5 prompt takes (the first, if a task gives several)."""
    flat = []
    for v in visuals or []:
        flat.extend(v if isinstance(v, list | tuple) else [v])
    if not flat:
        return None
    image = flat[0]
    if isinstance(image, str | Path) and Path(image).suffix.lower() in {".png", ".jpg", ".jpeg"}:
        return load_image(Path(image))
    if not isinstance(image, Image.Image):
        raise CLBenchError(f"lmms-eval task {task} gives {type(image).__name__} inputs; "
                           "cl-bench's bridge answers image and text tasks only")
    return to_rgb(image)


def cut_at(text: str, until: tuple[str, ...]) -> str:
    """``text`` up to the first stop sequence."""
    for stop in until:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text.strip()
