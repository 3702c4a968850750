"""Input prompts (cl_bench.models.prompting): training forward, scoring, cached generation."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from cl_bench.config import ModelConfig
from cl_bench.errors import CLBenchError
from cl_bench.evaluation.generation import greedy_config
from cl_bench.models.batching import collate_batch, prompt_item
from cl_bench.models.llava import IGNORE_INDEX, load_llava
from cl_bench.models.prompting import RowPrompts, attach_prompts, insertion_index

LENGTH = 3
QUESTIONS = [
    ("What colour is the square?", Image.new("RGB", (32, 32), (220, 30, 30))),
    ("red", None),
    ("What colour is the square? Answer with one word, please.",
     Image.new("RGB", (32, 32), (30, 30, 220))),
]


class TablePrompts(torch.nn.Module):
    """A prompt per sample of QUESTIONS; ``rows`` says which samples the batch holds."""

    def __init__(self, hidden: int, used: list[bool] | None = None) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.table = torch.nn.Parameter(2 * torch.randn(len(QUESTIONS), LENGTH, hidden,
                                                        generator=gen))
        self.used = None if used is None else torch.tensor(used)
        self.rows = torch.arange(len(QUESTIONS))

    def forward(self, rows: int) -> RowPrompts:
        return RowPrompts(self.table[self.rows],
                          None if self.used is None else self.used[self.rows])


@pytest.fixture
def bundle(tiny_llava):
    bundle = load_llava(tiny_llava)
    bundle.model.eval()
    return bundle


def text_batch(bundle, questions: list[str]) -> tuple[list[dict], dict]:
    items = [prompt_item(bundle, q, None) for q in questions]
    return items, collate_batch(items, bundle)


def test_insertion_index_places_each_rows_prompt_at_its_column() -> None:
    # row 0: prompt after position 0 (width 3, 2 prompt slots -> sources 0, 3, 4, 1, 2)
    # row 1: after position 2 (one leading pad and a BOS): sources 0, 1, 3, 4, 2
    index = insertion_index(torch.tensor([1, 2]), width=3, length=2)
    assert index.tolist() == [[0, 3, 4, 1, 2], [0, 1, 3, 4, 2]]


def test_forward_equals_the_sequence_built_by_hand(bundle) -> None:
    model = bundle.model
    source = TablePrompts(model.config.text_config.hidden_size)
    source.rows = torch.tensor([0, 1])
    items, batch = text_batch(bundle, [QUESTIONS[0][0], QUESTIONS[1][0]])  # right padded
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = IGNORE_INDEX
    handle = attach_prompts(model, source)
    with torch.no_grad():
        got = model(**batch, labels=labels, output_hidden_states=True)
    handle.remove()
    assert not hasattr(model, "input_prompts")
    assert got.logits.shape[:2] == batch["input_ids"].shape
    assert all(h.shape[1] == batch["input_ids"].shape[1] for h in got.hidden_states)
    embed = model.get_input_embeddings()
    losses = []
    for row, item in enumerate(items):
        ids = torch.tensor(item["ids"])
        e = embed(ids)
        sequence = torch.cat([e[:1], source.table[row].detach(), e[1:]]).unsqueeze(0)
        with torch.no_grad():
            reference = model(inputs_embeds=sequence).logits[0]
        keep = torch.cat([torch.tensor([0]), torch.arange(1 + LENGTH, len(ids) + LENGTH)])
        assert torch.allclose(got.logits[row, : len(ids)], reference[keep], atol=1e-5)
        losses.append(torch.nn.functional.cross_entropy(
            reference[keep][:-1], ids[1:], reduction="sum"))
    n_targets = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert torch.isclose(got.loss, sum(losses) / n_targets, atol=1e-5)  # labels need no fixing


def test_an_unused_prompt_changes_nothing_and_gradients_reach_only_the_prompts(bundle) -> None:
    model = bundle.model
    source = TablePrompts(model.config.text_config.hidden_size, used=[True, False, True])
    source.rows = torch.tensor([0, 1])
    _, batch = text_batch(bundle, [QUESTIONS[0][0], QUESTIONS[1][0]])
    with torch.no_grad():
        plain = model(**batch).logits
    model.requires_grad_(False)
    handle = attach_prompts(model, source)
    out = model(**batch)
    width = int(batch["attention_mask"][1].sum())
    assert torch.allclose(out.logits[1, :width], plain[1, :width], atol=1e-5)
    assert not torch.allclose(out.logits[0], plain[0], atol=1e-3)
    out.logits[0].sum().backward()
    assert source.table.grad[0].abs().sum() > 0 and source.table.grad[1].abs().sum() == 0
    assert all(p.grad is None for n, p in model.named_parameters() if "input_prompts" not in n)
    handle.remove()


def generate(model, bundle, source: TablePrompts, rows: list[int], tokens: int = 6):
    items = [prompt_item(bundle, *QUESTIONS[i]) for i in rows]
    batch = collate_batch(items, bundle, left_pad=True)
    source.rows = torch.tensor(rows)
    with torch.no_grad():
        out = model.generate(**batch, generation_config=greedy_config(bundle, tokens))
    return out[:, batch["input_ids"].shape[1]:].tolist()


def step_logits(model, bundle, row: int, tokens: int = 6) -> tuple[dict, list[torch.Tensor]]:
    """A sample's batch and the logits of each cached greedy step (the KV-cache path)."""
    batch = collate_batch([prompt_item(bundle, *QUESTIONS[row])], bundle)
    config = greedy_config(bundle, tokens)
    config.output_logits = config.return_dict_in_generate = True
    with torch.no_grad():
        return batch, [s[0] for s in model.generate(**batch, generation_config=config).logits]


@pytest.mark.parametrize("used", [None, [True, False, True]])
def test_batched_generation_equals_one_at_a_time_and_an_uncached_loop(bundle, used) -> None:
    model = bundle.model
    source = TablePrompts(model.config.text_config.hidden_size, used)
    handle = attach_prompts(model, source)
    batched = generate(model, bundle, source, [0, 1, 2])  # left padded, mixed image/text rows
    single = [generate(model, bundle, source, [i])[0] for i in range(3)]
    assert batched == single
    # the cached decoding steps against full forward passes without a cache, logit for logit
    source.rows = torch.tensor([2])
    batch, cached = step_logits(model, bundle, 2)
    ids = batch["input_ids"]
    for step, logits in enumerate(cached):
        with torch.no_grad():
            full = model(input_ids=ids, pixel_values=batch["pixel_values"], use_cache=False)
        assert torch.allclose(logits, full.logits[0, -1], atol=1e-4), step
        ids = torch.cat([ids, full.logits[:, -1:].argmax(-1)], dim=1)
    assert single[2] == ids[0, batch["input_ids"].shape[1]:].tolist()
    source.rows = torch.tensor([1])
    _, prompted = step_logits(model, bundle, 1)
    handle.remove()
    _, plain = step_logits(model, bundle, 1)
    unchanged = all(torch.allclose(a, b, atol=1e-4) for a, b in zip(prompted, plain, strict=True))
    assert unchanged == (used is not None)  # an unused prompt changes nothing, a used one does


def test_wrong_row_counts_and_double_attachment_are_errors(bundle) -> None:
    model = bundle.model
    source = TablePrompts(model.config.text_config.hidden_size)
    source.rows = torch.tensor([0, 1, 2])
    handle = attach_prompts(model, source)
    with pytest.raises(CLBenchError, match="already carries input prompts"):
        attach_prompts(model, source)
    _, batch = text_batch(bundle, ["red", "blue"])
    with pytest.raises(CLBenchError, match="prompts for 3 rows, batch of 2"):
        model(**batch)
    handle.remove()


def test_prompts_follow_a_bf16_model_and_stay_fp32(tiny_llava) -> None:
    bundle = load_llava(tiny_llava, ModelConfig(device="cpu", dtype="bf16"))
    model = bundle.model
    source = TablePrompts(model.config.text_config.hidden_size)
    source.rows = torch.tensor([0, 1])
    _, batch = text_batch(bundle, [QUESTIONS[0][0], QUESTIONS[1][0]])
    handle = attach_prompts(model, source)
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    handle.remove()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert source.table.dtype == source.table.grad.dtype == torch.float32
    assert source.table.grad.abs().sum() > 0
