"""Batched greedy generation (left padded, stopped at EOS) answers as one prompt at a time does,
on a model whose answers depend on the input."""

from __future__ import annotations

from pathlib import Path

from conftest import COLOURS, INQUIRIES

from cl_bench.config import ModelConfig
from cl_bench.evaluation.generation import generate_texts
from cl_bench.models.llava import load_llava
from tasks.loaders import Sample, load_test_samples
from tasks.suites.ucit import UCIT


def one_per_answer(samples: list[Sample]) -> list[Sample]:
    """The first test sample of each answer (each colour)."""
    firsts: dict[str, Sample] = {}
    for sample in samples:
        firsts.setdefault(sample.answer, sample)
    return list(firsts.values())


def test_batched_answers_are_the_answers_one_at_a_time(taught_llava: Path,
                                                       ucit_root: Path) -> None:
    bundle = load_llava(taught_llava, ModelConfig(device="cpu"))  # as taught
    samples = {task.name: one_per_answer(load_test_samples(UCIT.task_files(task, ucit_root)))
               for task in UCIT.resolve_order("RVA")}
    # prompts of different lengths (a word, a caption, options; text only), interleaved
    prompts = [(s.question, s.image) for group in zip(*samples.values(), strict=True)
               for s in group] + [(question, None) for question in INQUIRIES[:2]]
    alone = [generate_texts(bundle.model, bundle, [p], 1, 8)[0] for p in prompts]
    assert generate_texts(bundle.model, bundle, prompts, 5, 8) == alone
    assert generate_texts(bundle.model, bundle, prompts, len(prompts), 8) == alone

    answers = dict(zip([id(p) for p in prompts], alone, strict=True))
    words = [answers[id(p)] for p in prompts[0:9:3]]
    captions = [answers[id(p)] for p in prompts[1:9:3]]
    assert set(words) <= set(COLOURS) and len(set(words)) > 1  # one word, then EOS
    assert all(c.startswith("a ") and c.endswith(" square") for c in captions)
    right = [w == s.answer for w, s in zip(words, samples["ImageNet-R"], strict=True)]
    assert sum(right) >= 2
