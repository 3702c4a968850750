"""Batched greedy generation and scoring of a task's test samples."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from cl_bench.models import ModelBundle, encode_prompt, load_image
from cl_bench.training import collate_batch
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


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    bundle: ModelBundle,
    samples: list[Sample],
    batch_size: int,
    max_new_tokens: int,
    desc: str = "generate",
) -> dict[str, str]:
    """Answers to the first question of each sample, by id, in batches (left padded)."""
    model.eval()
    config = greedy_config(bundle, max_new_tokens)
    answers: dict[str, str] = {}
    for start in tqdm(range(0, len(samples), batch_size), desc=desc, leave=False):
        chunk = samples[start : start + batch_size]
        items = [
            {
                "ids": encode_prompt(bundle, s.question, s.image is not None),
                "image": load_image(s.image) if s.image is not None else None,
            }
            for s in chunk
        ]
        batch = collate_batch(items, bundle, left_pad=True)
        out = model.generate(**batch, generation_config=config)
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        texts = bundle.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        answers.update({s.id: text.strip() for s, text in zip(chunk, texts, strict=True)})
    return answers


def evaluate_task(
    model: torch.nn.Module,
    bundle: ModelBundle,
    task: str,
    answer_type: str,
    samples: list[Sample],
    batch_size: int,
    max_new_tokens: int,
    rule: str,
) -> TaskResult:
    """Generate and score one task."""
    predictions = generate_answers(model, bundle, samples, batch_size, max_new_tokens, task)
    references = {s.id: list(s.references) for s in samples}
    return TaskResult(task, score_task(answer_type, predictions, references, rule), predictions)
