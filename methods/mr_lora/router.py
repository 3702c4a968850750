"""MR-LoRA's expert-selection router: the routing question, the router set (a few training
samples of every learned task, answered with its expert's letter) and the reading of the
router's answer (reference: MLLM-CL ETrain/Eval/LLaVA/CoIN/model_agents_select_lora.py)."""

from __future__ import annotations

import random
import string

from cl_bench.errors import CLBenchError
from tasks.loaders import Sample

LETTERS = string.ascii_uppercase


def expert_letters(count: int) -> str:
    """The answer letters of ``count`` experts (A, B, ...)."""
    if count > len(LETTERS):
        raise CLBenchError(f"MR-LoRA's router names experts by letter: at most {len(LETTERS)} "
                           f"experts, not {count}")
    return LETTERS[:count]


def routing_question(question: str, experts: list[str]) -> str:
    """The router's prompt: the expert pool by letter, then the user's question (the reference
    describes each domain's expert by hand; here each expert is named by its task)."""
    pool = "\n".join(f"{letter}. the expert for {name}"
                     for letter, name in zip(expert_letters(len(experts)), experts, strict=True))
    return ("Choose the expert model best suited to answer the question below, from this "
            f"pool:\n{pool}\nQuestion: {question}\n"
            "Do not answer the question: reply with the letter of the expert only.")


def router_samples(
    tasks: list[tuple[str, list[Sample]]], per_task: int, seed: int
) -> list[Sample]:
    """The router set: ``per_task`` samples of each learned task (a seeded choice per task),
    asked the routing question and answered with that task's expert letter."""
    names = [name for name, _ in tasks]
    letters = expert_letters(len(tasks))
    chosen = []
    for i, (name, samples) in enumerate(tasks):
        picked = random.Random(f"{seed}:{name}").sample(samples, min(per_task, len(samples)))
        chosen += [Sample(f"router:{name}:{s.id}",
                          ((routing_question(s.question, names), letters[i]),), s.image)
                   for s in picked]
    return chosen


def chosen_expert(answer: str, count: int, rng: random.Random) -> tuple[int, bool]:
    """The expert a router answer selects, and whether it was valid. As the reference: an answer
    with more than one character besides the expert letters, or with none of them, is invalid
    and gets a random expert; otherwise the first letter (A, B, ...) it contains wins."""
    letters = expert_letters(count)
    text = answer.strip()
    if sum(c not in letters for c in text) <= 1:
        for i, letter in enumerate(letters):
            if letter in text:
                return i, True
    return rng.randrange(count), False
