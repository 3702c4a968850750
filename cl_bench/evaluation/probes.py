"""Base-model-degradation probes (LLaVA-c, "Base Model Degradation", Figures 2 and 6).

After every stage the model as the method assembles it answers a fixed set of open inquiries
(text-only and with an image, no format instruction). Measured against the starting model:

- format collapse: mean answer length (words) and its ratio to the starting model's, the median
  length (which answers that loop until the token limit do not inflate), the share
  of one-word and of short (at most ``SHORT_WORDS`` words) answers, the share of lone option
  letters, and the share of answers in each task's own answer format (learned from its training
  answers: option letter, a caption's typical opening, a known single-word answer);
- language shift (Figure 6): the mean L2 distance between the final hidden states of the current
  and the starting model on the inquiries' text tokens;
- a few answers side by side with the starting model's (Figure 2).

The starting model's answers and hidden states are computed once, at stage 0, and cached in
``<run>/probes/start.pt``; each stage's answers go to ``<run>/probes/stage_<t>.jsonl``.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cl_bench.errors import CLBenchError
from cl_bench.evaluation.generation import BeforeBatch, generate_texts
from cl_bench.evaluation.sharding import gather_rows, my_batches, on_main
from cl_bench.models.batching import collate_batch, prompt_item
from cl_bench.models.llava import ModelBundle
from cl_bench.models.placement import to_model
from tasks.loaders import read_records

PROBE_TOKENS = 64  # the runner gives the probes at least this many new tokens (full sentences)
SHORT_WORDS = 3  # a "short phrase" has at most this many words
N_EXAMPLES = 4  # side-by-side examples per stage (half text-only, half with an image)
OPENING_SHARE = 0.05  # a caption opening (first two words) is typical above this share
_LETTER = re.compile(r"^\(?[A-Za-z]\)?[.):]?$")
_BOX = re.compile(r"\[\s*-?[\d.]+\s*(,\s*-?[\d.]+\s*){3}\]")

Matcher = Callable[[str], bool]


@dataclass(frozen=True)
class Inquiry:
    """One open inquiry; ``image`` is None for a text-only one."""

    id: str
    text: str
    image: Path | None = None


@dataclass
class ProbeOutput:
    """A model's answers to the inquiries and its final hidden states on their text tokens."""

    ids: list[str]
    answers: list[str]
    hidden: list[torch.Tensor]


def load_inquiries(path: Path) -> list[Inquiry]:
    """``[{"id", "text", "image"?}]``; images are relative to the file's folder."""
    inquiries = []
    for record in read_records(path):
        if "id" not in record or "text" not in record:
            raise CLBenchError(f"{path}: probe record without id or text: {record}")
        image = path.parent / record["image"] if record.get("image") else None
        inquiries.append(Inquiry(str(record["id"]), str(record["text"]), image))
    if not inquiries:
        raise CLBenchError(f"{path}: no probes")
    return inquiries


# -- format collapse ----------------------------------------------------------------------------
def word_count(text: str) -> int:
    return len(text.split())


def mean_words(answers: Sequence[str]) -> float:
    return sum(map(word_count, answers)) / len(answers) if answers else 0.0


def median_words(answers: Sequence[str]) -> float:
    return float(statistics.median(map(word_count, answers))) if answers else 0.0


def share(answers: Sequence[str], matches: Matcher) -> float:
    """The fraction of answers for which ``matches`` holds."""
    return sum(map(matches, answers)) / len(answers) if answers else 0.0


def is_short(answer: str) -> bool:
    return word_count(answer) <= SHORT_WORDS


def is_one_word(answer: str) -> bool:
    return word_count(answer) <= 1


def is_option_letter(answer: str) -> bool:
    """A lone option letter: "B", "b.", "(C)", "D)"."""
    return bool(_LETTER.match(answer.strip()))


def normalize(text: str) -> str:
    return " ".join(text.lower().replace(",", " ").split()).strip(" .!?")


def opening(text: str) -> str:
    return " ".join(normalize(text).split()[:2])


def format_matcher(answer_type: str, train_answers: Sequence[str]) -> Matcher:
    """Whether an answer has the format a task trains: its lone option letters, a caption's
    typical opening (first two words), a box, or one of its known short answers."""
    if answer_type == "option":
        return is_option_letter
    if answer_type == "bbox":
        return lambda a: bool(_BOX.search(a))
    known = {normalize(a) for a in train_answers}
    if answer_type != "caption":
        return lambda a: normalize(a) in known
    counts = Counter(opening(a) for a in train_answers)
    typical = {o for o, c in counts.items() if o and c >= OPENING_SHARE * len(train_answers)}
    return lambda a: normalize(a) in known or (bool(normalize(a)) and opening(a) in typical)


# -- language shift -----------------------------------------------------------------------------
def language_shift(current: Sequence[torch.Tensor], start: Sequence[torch.Tensor]) -> float:
    """Mean over inquiries of the mean per-token L2 distance between final hidden states."""
    if len(current) != len(start) or not current:
        raise CLBenchError(f"language shift: {len(current)} inquiries against {len(start)}")
    distances = []
    for cur, ref in zip(current, start, strict=True):
        if cur.shape != ref.shape:
            raise CLBenchError(f"language shift: hidden states {cur.shape} vs {ref.shape}")
        distances.append(torch.linalg.vector_norm(cur.float() - ref.float(), dim=-1).mean())
    return float(torch.stack(distances).mean())


@torch.no_grad()
def final_hidden_states(
    model: torch.nn.Module, bundle: ModelBundle, inquiries: Sequence[Inquiry], batch_size: int,
    before_batch: BeforeBatch | None = None, sharded: bool = False,
) -> list[torch.Tensor]:
    """Each inquiry's last-layer hidden states at its prompt's text tokens (float32, CPU);
    ``sharded``: the batches dealt out to the ranks, every state gathered on every rank."""
    model.eval()
    batches = [list(range(start, min(start + batch_size, len(inquiries))))
               for start in range(0, len(inquiries), batch_size)]
    rows: list[int] = []
    states: list[torch.Tensor] = []
    for chunk in my_batches(batches) if sharded else batches:
        items = [prompt_item(bundle, inquiries[i].text, inquiries[i].image) for i in chunk]
        if before_batch is not None:
            before_batch([(inquiries[i].text, item["image"])
                          for i, item in zip(chunk, items, strict=True)])
        batch = to_model(collate_batch(items, bundle), model)
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
        keep = batch["attention_mask"].bool() & (batch["input_ids"] != bundle.image_token_id)
        states += [hidden[row][keep[row]].float().cpu() for row in range(len(chunk))]
        rows += chunk
    return gather_rows(rows, states, len(inquiries), across_ranks=sharded)


def probe_model(
    model: torch.nn.Module, bundle: ModelBundle, inquiries: Sequence[Inquiry], batch_size: int,
    max_new_tokens: int, before_batch: BeforeBatch | None = None, sharded: bool = False,
) -> ProbeOutput:
    """Greedy answers and final hidden states of ``model`` on the inquiries (``sharded``: over
    the ranks of the process group, every output on every rank)."""
    prompts = [(q.text, q.image) for q in inquiries]
    answers = generate_texts(
        model, bundle, prompts, batch_size, max_new_tokens, "probes", before_batch,
        sharded=sharded,
    )
    hidden = final_hidden_states(model, bundle, inquiries, batch_size, before_batch, sharded)
    return ProbeOutput([q.id for q in inquiries], answers, hidden)


# -- per stage ----------------------------------------------------------------------------------
def probe_metrics(
    answers: Sequence[str], start_answers: Sequence[str], formats: dict[str, Matcher],
    learned: Sequence[str], shift: float,
) -> dict:
    """The stage's probe numbers (shares are fractions 0..1)."""
    start_words = mean_words(start_answers)

    def learned_format(a: str) -> bool:
        return any(formats[t](a) for t in learned)

    return {
        "n": len(answers),
        "mean_words": mean_words(answers),
        "start_mean_words": start_words,
        "length_ratio": mean_words(answers) / start_words if start_words else None,
        "median_words": median_words(answers),
        "start_median_words": median_words(start_answers),
        "short_share": share(answers, is_short),
        "one_word_share": share(answers, is_one_word),
        "option_share": share(answers, is_option_letter),
        "format_share": {task: share(answers, m) for task, m in formats.items()},
        "learned_format_share": share(answers, learned_format),
        "start_learned_format_share": share(start_answers, learned_format),
        "language_shift": shift,
    }


def subset(inquiries: Sequence[Inquiry], n: int | None) -> list[Inquiry]:
    """At most ``n`` inquiries, text-only and with an image alternating (file order kept)."""
    if n is None or n >= len(inquiries):
        return list(inquiries)
    text = [q for q in inquiries if q.image is None]
    image = [q for q in inquiries if q.image is not None]
    mixed = [q for pair in zip(text, image, strict=False) for q in pair]
    mixed += text[len(image) :] + image[len(text) :]
    chosen = {q.id for q in mixed[:n]}
    return [q for q in inquiries if q.id in chosen]


def pick_examples(inquiries: Sequence[Inquiry], n: int = N_EXAMPLES) -> list[int]:
    """Indices of the first ``n // 2`` text-only and first image inquiries (file order)."""
    text = [i for i, q in enumerate(inquiries) if q.image is None]
    image = [i for i, q in enumerate(inquiries) if q.image is not None]
    chosen = text[: n // 2] + image[: n - n // 2]
    rest = [i for i in range(len(inquiries)) if i not in chosen]
    return sorted(chosen + rest[: n - len(chosen)])


def run_probes(
    model: torch.nn.Module, bundle: ModelBundle, inquiries: Sequence[Inquiry], stage: int,
    folder: Path, batch_size: int, max_new_tokens: int, formats: dict[str, Matcher],
    learned: Sequence[str], before_batch: BeforeBatch | None = None,
) -> dict:
    """Probe ``model`` after ``stage``; stage 0 caches the starting model in ``folder``. Under a
    process group the ranks share the generation; rank 0 writes the files and every rank
    returns its numbers."""
    out = probe_model(model, bundle, inquiries, batch_size, max_new_tokens, before_batch,
                      sharded=True)
    return on_main(lambda: probe_record(out, inquiries, stage, folder, formats, learned))


def probe_record(
    out: ProbeOutput, inquiries: Sequence[Inquiry], stage: int, folder: Path,
    formats: dict[str, Matcher], learned: Sequence[str],
) -> dict:
    """The stage's probe numbers against the starting model's; writes ``stage_<t>.jsonl`` (and
    ``start.pt`` at stage 0)."""
    folder.mkdir(parents=True, exist_ok=True)
    start_file = folder / "start.pt"
    if stage == 0:
        torch.save({"ids": out.ids, "answers": out.answers, "hidden": out.hidden}, start_file)
        start = out
    else:
        start = load_start(start_file, out.ids)
    shift = 0.0 if stage == 0 else language_shift(out.hidden, start.hidden)
    metrics = probe_metrics(out.answers, start.answers, formats, learned, shift)
    with open(folder / f"stage_{stage}.jsonl", "w") as f:
        for q, answer, first in zip(inquiries, out.answers, start.answers, strict=True):
            row = {"id": q.id, "text": q.text, "image": q.image is not None,
                   "answer": answer, "start": first}
            f.write(json.dumps(row) + "\n")
    metrics["examples"] = [
        {"id": inquiries[i].id, "text": inquiries[i].text,
         "image": inquiries[i].image is not None, "start": start.answers[i],
         "answer": out.answers[i]}
        for i in pick_examples(inquiries)
    ]
    return metrics


def load_start(path: Path, ids: list[str]) -> ProbeOutput:
    """The cached starting model's probe output, checked against the current inquiries."""
    if not path.exists():
        raise CLBenchError(f"{path} is missing: the starting model was not probed at stage 0")
    data = torch.load(path, weights_only=True)
    if list(data["ids"]) != ids:
        raise CLBenchError(f"{path} was made on other inquiries than the suite's probe file")
    return ProbeOutput(list(data["ids"]), list(data["answers"]), list(data["hidden"]))
