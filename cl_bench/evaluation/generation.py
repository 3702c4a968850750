"""Batched greedy generation and scoring of a task's test samples."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import GenerationConfig

from cl_bench.models.batching import collate_batch, prompt_item
from cl_bench.models.llava import ModelBundle
from cl_bench.models.placement import to_model
from tasks.loaders import Sample
from tasks.scoring import TaskScore, score_task


@dataclass(frozen=True)
class TaskResult:
    """A task's score with every prediction, matched to references by question id."""

    task: str
    score: TaskScore
    predictions: dict[str, str]


def greedy_config(bundle: ModelBundle, max_new_tokens: int) -> GenerationConfig:
    """Greedy decoding whatever the model folder's generation_config says (spec)."""
    tok = bundle.tokenizer
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )


Prompt = tuple[str, Path | Image.Image | None]
BeforeBatch = Callable[[list[tuple[str, Image.Image | None]]], None]


@torch.no_grad()
def generate_texts(
    model: torch.nn.Module,
    bundle: ModelBundle,
    prompts: Sequence[Prompt],
    batch_size: int,
    max_new_tokens: int,
    desc: str = "generate",
    before_batch: BeforeBatch | None = None,
) -> list[str]:
    """Greedy answers to one-turn prompts ``(question, image path, PIL image or None)``, in
    batches (left padded); images are loaded one batch at a time. ``before_batch`` sees each
    batch's ``(question, PIL image or None)`` pairs before it is generated (method hooks)."""
    model.eval()
    config = greedy_config(bundle, max_new_tokens)
    texts: list[str] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
        chunk = prompts[start : start + batch_size]
        items = [prompt_item(bundle, question, image) for question, image in chunk]
        if before_batch is not None:
            before_batch([(q, item["image"]) for (q, _), item in zip(chunk, items, strict=True)])
        batch = to_model(collate_batch(items, bundle, left_pad=True), model)
        out = model.generate(**batch, generation_config=config)
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        decoded = bundle.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        texts += [text.strip() for text in decoded]
    return texts


def generate_answers(
    model: torch.nn.Module,
    bundle: ModelBundle,
    samples: list[Sample],
    batch_size: int,
    max_new_tokens: int,
    desc: str = "generate",
    before_batch: BeforeBatch | None = None,
) -> dict[str, str]:
    """Answers to the first question of each sample, by id."""
    prompts = [(s.question, s.image) for s in samples]
    texts = generate_texts(model, bundle, prompts, batch_size, max_new_tokens, desc, before_batch)
    return {s.id: text for s, text in zip(samples, texts, strict=True)}


def evaluate_task(
    model: torch.nn.Module,
    bundle: ModelBundle,
    task: str,
    answer_type: str,
    samples: list[Sample],
    batch_size: int,
    max_new_tokens: int,
    rule: str,
    before_batch: BeforeBatch | None = None,
) -> TaskResult:
    """Generate and score one task."""
    predictions = generate_answers(
        model, bundle, samples, batch_size, max_new_tokens, task, before_batch
    )
    references = {s.id: list(s.references) for s in samples}
    return TaskResult(task, score_task(answer_type, predictions, references, rule), predictions)
