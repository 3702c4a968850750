"""Does a language model of the micro world's size learn option lookup, and after how many steps?

The micro world's option tasks (ArxivQA, IconQA) need the model to answer with the letter written
before the option that matches its answer: an in-context lookup. This script trains a fresh
Llama of the micro base's text size on text-only lookup questions ("Which option is red?" over
four colour options, answered with a letter) and prints the held-out accuracy along the way.
Chance is 25 %. ``--queries N`` asks N questions about the same options in one conversation
(more supervised answers per sequence).

    python benchmarks/micro_lookup.py --steps 1500
    python benchmarks/micro_lookup.py --steps 3000 --queries 3 --lr 3e-4
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cl_bench.models.llava import user_prompt
from tasks.micro.model import TinyConfig, train_tokenizer
from tasks.micro.world import COLOURS, LETTERS

INSTRUCTION = "Answer with the option's letter from the given choices directly."


def conversation(rng: random.Random, queries: int) -> list[tuple[str, str]]:
    """(prompt, answer) turns: ``queries`` lookups over one block of four options."""
    options = rng.sample(list(COLOURS), 4)
    asked = rng.sample(range(4), queries)
    block = "\n".join(f"{letter}. {o}" for letter, o in zip(LETTERS, options, strict=False))
    first = user_prompt(f"Which option is {options[asked[0]]}?\n{block}\n{INSTRUCTION}", 0)
    turns = [(first, " " + LETTERS[asked[0]])]
    turns += [("</s>" + user_prompt(f"Which option is {options[k]}?", 0), " " + LETTERS[k])
              for k in asked[1:]]
    return turns


def batch(tokenizer, rng: random.Random, size: int, queries: int) -> tuple[torch.Tensor, ...]:
    """Right-padded input ids and labels (the answers' tokens only)."""
    ids, labels = [], []
    for _ in range(size):
        seq, lab = [], []
        for prompt, answer in conversation(rng, queries):
            p = tokenizer(prompt, add_special_tokens=False).input_ids
            a = tokenizer(answer, add_special_tokens=False).input_ids
            seq += p + a
            lab += [-100] * len(p) + a
        ids.append(seq)
        labels.append(lab)
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    return (torch.tensor([s + [pad] * (width - len(s)) for s in ids]),
            torch.tensor([s + [-100] * (width - len(s)) for s in labels]))


@torch.no_grad()
def first_answer_accuracy(model, tokenizer, n: int = 400) -> float:
    """Share of held-out single lookups whose letter is predicted right (greedy)."""
    model.eval()
    ids, labels = batch(tokenizer, random.Random(10_000), n, 1)
    predicted = model(input_ids=ids).logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    letter = (target != -100).cumsum(1) == (target != -100).sum(1, keepdim=True)
    letter &= target != -100  # the last answer token: the letter
    model.train()
    return 100 * (predicted[letter] == target[letter]).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--queries", type=int, default=1, choices=(1, 2, 3, 4))
    parser.add_argument("--layers", type=int, default=TinyConfig.text_layers)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    tiny = TinyConfig()
    texts = [t for _ in range(50) for p, a in conversation(random.Random(_), 4) for t in (p, a)]
    tokenizer = train_tokenizer(texts, 400)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=tiny.text_hidden,
        intermediate_size=tiny.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=tiny.heads, num_key_value_heads=tiny.heads,
        max_position_embeddings=tiny.max_positions, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps,
                                                   pct_start=0.03)
    rng, started = random.Random(args.seed), time.time()
    print(f"threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}; chance 25 %")
    for step in range(1, args.steps + 1):
        ids, labels = batch(tokenizer, rng, args.batch, args.queries)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % args.every == 0 or step == args.steps:
            accuracy = first_answer_accuracy(model, tokenizer)
            print(f"step {step:5d}  loss {loss.item():.3f}  held-out lookup {accuracy:5.1f} %  "
                  f"{time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
