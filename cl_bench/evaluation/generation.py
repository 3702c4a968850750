"""Batched greedy generation and scoring of a task's test samples, fast at scale.

``generate_texts`` tokenizes every prompt once, sorts the prompts by length (longest first, so an
out-of-memory batch fails at once) and cuts them into batches; images are loaded and
preprocessed in DataLoader workers (``workers``) while the model generates. Rows are left padded
with their attention mask (``generate`` derives the position ids from it), each row stops at its
EOS and a batch at its last; answers are decoded after the loop and put back in input order.
With ``sharded`` and a process group of N ranks, the same batches are dealt out to the ranks
(``cl_bench.evaluation.sharding``): the predictions equal a single process's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import GenerationConfig

from cl_bench.evaluation.sharding import gather_rows, is_main, my_batches
from cl_bench.method import Method
from cl_bench.models.backbones import Backbone
from cl_bench.models.llava import ModelBundle, encode_prompt, load_image
from cl_bench.models.placement import device_of, to_model
from tasks.images import to_rgb
from tasks.loaders import Sample
from tasks.scoring import TaskScore, score_task

CUDA_WORKERS = 4  # image workers when ``eval.workers`` is None and the model is on a GPU


@dataclass(frozen=True)
class TaskResult:
    """A task's score with every prediction, matched to references by question id."""

    task: str
    score: TaskScore
    predictions: dict[str, str]


def greedy_config(bundle: ModelBundle, max_new_tokens: int) -> GenerationConfig:
    """Greedy decoding whatever the model folder's generation_config says (spec); a row ends at
    EOS and ``generate`` stops when every row has."""
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


def image_workers(workers: int | None, model: torch.nn.Module) -> int:
    """``eval.workers``; None: ``CUDA_WORKERS`` beside a GPU, 0 (this process) on the CPU, where
    generation itself uses every core."""
    if workers is not None:
        return workers
    return CUDA_WORKERS if device_of(model).type == "cuda" else 0


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row indices in batches of similar length (longest first; ties in input order)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


@dataclass(frozen=True)
class PromptBatcher:
    """Makes left-padded generation batches from prompt rows; picklable without the model, so it
    runs in DataLoader workers (images are opened and preprocessed there)."""

    ids: list[list[int]]
    images: list[Path | Image.Image | None]
    pad_id: int
    backbone: Backbone
    image_processor: object
    aspect_ratio: str
    keep_images: bool  # hand the PIL images on (for a method's before_batch hook)

    def __call__(self, rows: list[int]) -> tuple[list[int], dict, list[Image.Image | None]]:
        images = [self._image(row) for row in rows]
        lengths = torch.tensor([len(self.ids[row]) for row in rows])
        width = int(lengths.max())
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.arange(width).unsqueeze(0) >= (width - lengths).unsqueeze(1)
        input_ids[mask] = torch.tensor([t for row in rows for t in self.ids[row]])
        batch = {"input_ids": input_ids, "attention_mask": mask.long()}
        present = [image for image in images if image is not None]
        if present:
            batch["pixel_values"] = self.backbone.pixel_values(
                self.image_processor, present, self.aspect_ratio)
        return rows, batch, images if self.keep_images else []

    def _image(self, row: int) -> Image.Image | None:
        image = self.images[row]
        if isinstance(image, Path):
            return load_image(image)
        return None if image is None else to_rgb(image)


class _Rows(Dataset):
    """Dataset of row indices; the batcher does the work (``DataLoader`` needs a Dataset)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, row: int) -> int:
        return row


@torch.no_grad()
def generate_texts(
    model: torch.nn.Module,
    bundle: ModelBundle,
    prompts: Sequence[Prompt],
    batch_size: int,
    max_new_tokens: int,
    desc: str = "generate",
    before_batch: BeforeBatch | None = None,
    *,
    workers: int | None = 0,
    sharded: bool = False,
) -> list[str]:
    """Greedy answers to one-turn prompts ``(question, image path, PIL image or None)``, in
    input order (module doc). ``before_batch`` sees each batch's ``(question, PIL image or
    None)`` pairs before it is generated (method hooks). ``workers``: image loading processes
    (None: ``image_workers``). ``sharded``: deal the batches out to the ranks of the process
    group; every rank must call with the same prompts and gets every answer."""
    model.eval()
    config = greedy_config(bundle, max_new_tokens)
    ids = [encode_prompt(bundle, question, image is not None) for question, image in prompts]
    batches = length_batches([len(i) for i in ids], batch_size)
    if sharded:
        batches = my_batches(batches)
    batcher = PromptBatcher(
        ids, [image for _, image in prompts], bundle.tokenizer.pad_token_id, bundle.backbone,
        bundle.processor.image_processor, bundle.image_aspect_ratio, before_batch is not None,
    )
    n_workers = min(image_workers(workers, model), len(batches))
    loader = DataLoader(
        _Rows(len(prompts)), batch_sampler=batches, collate_fn=batcher, num_workers=n_workers,
        pin_memory=n_workers > 0 and device_of(model).type == "cuda",
    )
    rows: list[int] = []
    tokens: list[torch.Tensor] = []
    show = is_main() and len(batches) > 1
    for batch_rows, batch, images in tqdm(loader, desc=desc, total=len(batches), leave=False,
                                          disable=not show):
        if before_batch is not None:
            before_batch([(prompts[row][0], image)
                          for row, image in zip(batch_rows, images, strict=True)])
        batch = to_model(batch, model)
        out = model.generate(**batch, generation_config=config)
        rows += batch_rows
        tokens.append(out[:, batch["input_ids"].shape[1] :].cpu())
    generated = [row for block in tokens for row in block.tolist()]
    # a rank dealt no batch decodes nothing (batch_decode([]) gives one empty text)
    decoded = (bundle.tokenizer.batch_decode(generated, skip_special_tokens=True)
               if generated else [])
    texts = [text.strip() for text in decoded]
    return gather_rows(rows, texts, len(prompts), across_ranks=sharded)


def generate_answers(
    model: torch.nn.Module,
    bundle: ModelBundle,
    samples: list[Sample],
    batch_size: int,
    max_new_tokens: int,
    desc: str = "generate",
    before_batch: BeforeBatch | None = None,
    *,
    workers: int | None = 0,
    sharded: bool = False,
) -> dict[str, str]:
    """Answers to the first question of each sample, by id (in sample order)."""
    prompts = [(s.question, s.image) for s in samples]
    texts = generate_texts(model, bundle, prompts, batch_size, max_new_tokens, desc, before_batch,
                           workers=workers, sharded=sharded)
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
    *,
    workers: int | None = 0,
    sharded: bool = False,
) -> TaskResult:
    """Generate and score one task."""
    predictions = generate_answers(
        model, bundle, samples, batch_size, max_new_tokens, task, before_batch,
        workers=workers, sharded=sharded,
    )
    return scored(task, answer_type, samples, predictions, rule)


def scored(task: str, answer_type: str, samples: list[Sample], predictions: dict[str, str],
           rule: str) -> TaskResult:
    """A task's predictions scored against its samples' references."""
    references = {s.id: list(s.references) for s in samples}
    return TaskResult(task, score_task(answer_type, predictions, references, rule), predictions)


def method_hook(method: Method | None, model: torch.nn.Module, label: str) -> BeforeBatch | None:
    """``method.before_generate`` on ``model`` for the set ``label``; None for no method or one
    that keeps the base class's no-op (its batches then carry no images back from workers)."""
    if method is None or type(method).before_generate is Method.before_generate:
        return None
    return functools.partial(method.before_generate, model, label=label)
