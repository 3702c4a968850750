"""Fast evaluation: length-sorted batches give the one-at-a-time answers in input order, rows
stop at EOS, and sharded generation under torchrun equals a single process's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cl_bench.errors import CLBenchError
from cl_bench.evaluation.generation import generate_texts, length_batches, method_hook
from cl_bench.evaluation.sharding import gather_rows
from cl_bench.method import Method
from cl_bench.models.llava import encode_prompt, load_llava
from tasks.loaders import load_samples

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tiny_llava: Path):
    return load_llava(tiny_llava)


def prompts_of(ucit_root: Path, task: str = "ArxivQA") -> list[tuple]:
    folder = ucit_root / "UCIT"
    samples = load_samples(folder / task / "test.json", folder / "datasets")
    text_only = [("red?", None), ("What colour is the square? Answer with one word.", None)]
    return [(s.question, s.image) for s in samples] + text_only


def test_length_batches_longest_first_ties_in_input_order() -> None:
    assert length_batches([3, 5, 3, 9, 5], 2) == [[3, 1], [4, 0], [2]]


def test_gather_rows_restores_input_order_and_names_lost_rows() -> None:
    assert gather_rows([2, 0, 1], ["c", "a", "b"], 3) == ["a", "b", "c"]
    with pytest.raises(CLBenchError, match="lost 1 of 3 rows"):
        gather_rows([2, 0], ["c", "a"], 3)


def test_method_hook_only_for_methods_that_look_at_batches() -> None:
    class Routing(Method):
        def before_generate(self, model, prompts, label):
            self.seen = (model, len(prompts), label)

    assert method_hook(None, "model", "A") is None
    assert method_hook(Method(None, None), "model", "A") is None
    routing = Routing(None, None)
    method_hook(routing, "model", "A")([("q", None)])
    assert routing.seen == ("model", 1, "A")


def test_batched_answers_equal_one_at_a_time_in_input_order(bundle, ucit_root: Path) -> None:
    prompts = prompts_of(ucit_root) + prompts_of(ucit_root, "ImageNet-R")
    lengths = {len(q) for q, _ in prompts}
    assert len(lengths) > 2  # left padding is exercised
    single = [generate_texts(bundle.model, bundle, [p], 1, 8)[0] for p in prompts]
    assert len(set(single)) > 2  # distinct answers: a wrong order would show
    batched = generate_texts(bundle.model, bundle, prompts, 3, 8, workers=1)
    assert batched == single
    reversed_answers = generate_texts(bundle.model, bundle, prompts[::-1], 4, 8)
    assert reversed_answers == single[::-1]


def test_hook_sees_each_batch_rows_with_their_images(bundle, ucit_root: Path) -> None:
    prompts = prompts_of(ucit_root)
    seen: list[tuple[str, bool]] = []
    generate_texts(bundle.model, bundle, prompts, 2, 2,
                   before_batch=lambda rows: seen.extend((q, img is not None) for q, img in rows))
    assert sorted(seen) == sorted((q, img is not None) for q, img in prompts)


THREE = [("red?", None), ("What colour is it?", None), ("What colour is the square?", None)]


def generate_forcing(bundle, token_at: Callable[[int, int], int | None],
                     max_new_tokens: int) -> tuple[list[str], int]:
    """``THREE``'s answers in one batch, ``token_at(prompt, step)`` (a token id, or None) forced
    into each row's logits at each decoding step; and how many steps the decoder ran."""
    ids = [encode_prompt(bundle, q, False) for q, _ in THREE]
    in_batch = length_batches([len(i) for i in ids], 3)[0]  # prompt index of each batch row
    steps: list[int] = []

    def force(_module, _inputs, logits: torch.Tensor) -> torch.Tensor:
        for row, prompt in enumerate(in_batch):
            token = token_at(prompt, len(steps))
            if token is not None:
                logits[row, -1, token] = 1e4
        steps.append(len(steps))
        return logits

    handle = bundle.model.lm_head.register_forward_hook(force)
    try:
        return generate_texts(bundle.model, bundle, THREE, 3, max_new_tokens), len(steps)
    finally:
        handle.remove()


def test_rows_stop_at_eos_and_the_batch_when_all_have(bundle, monkeypatch) -> None:
    """EOS is forced into row r's logits at step ``stop[r]``: each answer is the one of
    ``stop[r]`` new tokens, and the decoder runs only as many steps as the last row needs.
    The model folder's generation_config names no EOS: the tokenizer's is used all the same
    (``generate`` fills a None in the config it is given from the model's)."""
    monkeypatch.setattr(bundle.model.generation_config, "eos_token_id", None)
    stop = {0: 1, 1: 3, 2: 2}  # prompt -> the step at which it ends
    eos = bundle.tokenizer.eos_token_id
    forced, steps = generate_forcing(bundle, lambda p, step: eos if step == stop[p] else None, 6)
    assert steps == max(stop.values()) + 1
    cut = [generate_texts(bundle.model, bundle, [p], 1, stop[i])[0] for i, p in enumerate(THREE)]
    assert forced == cut
    assert len(set(cut)) == 3


def test_answers_are_the_new_tokens_decoded_and_stripped(bundle) -> None:
    """The decoder is made to say prompt p's words, then EOS: each answer is exactly those words
    (no prompt token, no EOS or padding, no leading space or newline), in input order."""
    tok = bundle.tokenizer
    said = [tok(w, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            for w in (" blue", " red green", "\ngreen")]
    answers, _ = generate_forcing(bundle, lambda p, step: said[p][min(step, len(said[p]) - 1)], 8)
    assert answers == ["blue", "red green", "green"]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_sharded_evaluation_equals_one_process(bundle, tiny_llava: Path, ucit_root: Path,
                                               tmp_path: Path) -> None:
    """Two gloo ranks: generation and probes give the single process's outputs, each rank did
    its share, routing counts sum over the ranks, and rank 0's error reaches rank 1."""
    from sharded_generation import inquiries, sharded_prompts

    from cl_bench.evaluation.probes import probe_model

    test_file = ucit_root / "UCIT" / "ArxivQA" / "test.json"
    out = tmp_path / "sharded.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "tests" / "sharded_generation.py"), str(tiny_llava), str(test_file),
         str(out)],
        check=True, env=env, cwd=ROOT, timeout=300, capture_output=True,
    )
    result = json.loads(out.read_text())
    assert result["texts"] == generate_texts(bundle.model, bundle, sharded_prompts(test_file), 2, 6)
    single = probe_model(bundle.model, bundle, inquiries(test_file), 2, 4)
    assert result["probe_answers"] == single.answers
    hidden = torch.load(out.with_suffix(".pt"))
    # the ranks run 1 thread, this process more: float sums in another order, not other rows
    assert [h.shape for h in hidden] == [h.shape for h in single.hidden]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(hidden, single.hidden, strict=True))
    ranks = result["ranks"]
    prompts = sharded_prompts(test_file)
    ids = [encode_prompt(bundle, q, image is not None) for q, image in prompts]
    batches = length_batches([len(i) for i in ids], 2)
    assert len(batches) > 2  # both ranks get batches; rank 0 every other one from the first
    assert [r["rows"] for r in ranks] == [sum(map(len, batches[rank::2])) for rank in (0, 1)]
    assert [r["counts"] for r in ranks] == [{"r0": [1, 1]}] * 2
    assert ranks[0]["error"] == "boom"
    assert ranks[1]["error"] == "rank 0 failed: CLBenchError: boom"
