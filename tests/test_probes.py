"""Degradation probes: format-collapse numbers and language shift on hand-computed cases, and
the stage-0 cache on the tiny LLaVA."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from bench_files import write_probes

from cl_bench.errors import CLBenchError
from cl_bench.evaluation.probes import (
    Inquiry,
    format_matcher,
    is_option_letter,
    is_short,
    language_shift,
    load_inquiries,
    mean_words,
    median_words,
    pick_examples,
    probe_metrics,
    run_probes,
    share,
    subset,
)


def test_lengths_and_shares() -> None:
    answers = ["The sky is blue today.", "B", "a red square", "", "Four objects are left here"]
    assert mean_words(answers) == pytest.approx((5 + 1 + 3 + 0 + 5) / 5)
    assert share(answers, is_short) == pytest.approx(3 / 5)
    assert [is_option_letter(a) for a in ["B", "(c)", "D.", "A)", "A cat", "AB", ""]] == [
        True, True, True, True, False, False, False]
    assert share(answers, is_option_letter) == pytest.approx(1 / 5)
    assert mean_words([]) == 0.0 and share([], is_short) == 0.0
    # the median: 0 1 3 5 5 -> 3; an answer looping to the token limit moves the mean, not it
    assert median_words(answers) == 3.0 and median_words([*answers, "one " * 64]) == 4.0
    assert median_words([]) == 0.0


def test_task_formats_are_learned_from_training_answers() -> None:
    option = format_matcher("option", ["A", "C"])
    assert option("B") and not option("The answer is B because")
    word = format_matcher("word", ["house", "tree", "three"])
    assert word("House.") and word(" three") and not word("a house")
    captions = [f"a {c} {s}" for c in ("red", "blue") for s in ("circle", "square")] * 5
    captions += ["one odd caption"]
    caption = format_matcher("caption", captions)
    assert caption("a red triangle")  # a typical opening ("a red")
    assert caption("One odd caption.")  # a known caption
    assert not caption("The capital of France is Paris.")  # "the capital" is no opening
    assert not caption("")
    box = format_matcher("bbox", [])
    assert box("[0.1, 0.2, 0.5, 0.6]") and not box("left")


def test_language_shift_is_mean_per_token_l2() -> None:
    start = [torch.zeros(2, 2), torch.zeros(1, 2)]
    current = [torch.tensor([[0.0, 0.0], [3.0, 4.0]]), torch.tensor([[1.0, 0.0]])]
    # inquiry 1: tokens at distance 0 and 5 -> 2.5; inquiry 2: 1 -> mean 1.75
    assert language_shift(current, start) == pytest.approx(1.75)
    assert language_shift(start, start) == 0.0
    with pytest.raises(CLBenchError):
        language_shift(current[:1], start)
    with pytest.raises(CLBenchError):
        language_shift([torch.zeros(3, 2), torch.zeros(1, 2)], start)


def test_probe_metrics_hand_case() -> None:
    formats = {"Opt": format_matcher("option", ["A"]), "Word": format_matcher("word", ["dog"])}
    start = ["It is a sunny day in the park.", "There are two dogs playing."]  # 8 and 5 words
    now = ["B", "dog"]
    m = probe_metrics(now, start, formats, ["Opt"], shift=0.5)
    assert m["mean_words"] == 1.0 and m["start_mean_words"] == 6.5
    assert m["length_ratio"] == pytest.approx(1 / 6.5)
    assert m["median_words"] == 1.0 and m["start_median_words"] == 6.5
    assert m["short_share"] == 1.0 and m["one_word_share"] == 1.0 and m["option_share"] == 0.5
    assert m["format_share"] == {"Opt": 0.5, "Word": 0.5}
    assert m["learned_format_share"] == 0.5 and m["start_learned_format_share"] == 0.0
    assert m["language_shift"] == 0.5


def test_examples_and_subsets_mix_text_and_image() -> None:
    qs = [Inquiry(str(i), "q", Path("x.png") if i >= 3 else None) for i in range(6)]
    assert pick_examples(qs, 4) == [0, 1, 3, 4]
    assert pick_examples(qs[:3], 4) == [0, 1, 2]
    assert [q.id for q in subset(qs, 3)] == ["0", "1", "3"]
    assert [q.id for q in subset(qs[:4], 3)] == ["0", "1", "3"]
    assert subset(qs, None) == qs and subset(qs, 10) == qs


def test_run_probes_caches_the_start_and_measures_shift(tiny_llava: Path, tmp_path: Path) -> None:
    from cl_bench.models.llava import load_llava

    bundle = load_llava(tiny_llava)
    inquiries = load_inquiries(write_probes(tmp_path / "general"))
    assert inquiries[1].image == tmp_path / "general" / "red.png"
    formats = {"Opt": format_matcher("option", ["A"])}
    folder = tmp_path / "run" / "probes"

    def probe(model, stage: int) -> dict:
        return run_probes(model, bundle, inquiries, stage, folder, 2, 4, formats, ["Opt"])

    start = probe(bundle.model, 0)
    assert (folder / "start.pt").exists() and start["language_shift"] == 0.0
    assert start["n"] == 3 and start["length_ratio"] in (1.0, None)
    same = probe(bundle.model, 1)  # an unchanged model: no shift, the same answers
    assert same["language_shift"] == pytest.approx(0.0, abs=1e-6)
    assert [e["answer"] for e in same["examples"]] == [e["start"] for e in same["examples"]]
    changed = copy.deepcopy(bundle.model)
    with torch.no_grad():
        for p in changed.parameters():
            p.add_(0.05 * torch.randn_like(p))
    moved = probe(changed, 2)
    assert moved["language_shift"] > 0.0
    rows = [json.loads(line) for line in (folder / "stage_2.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["p1", "p2", "p3"] and rows[1]["image"] is True
    assert [e["id"] for e in moved["examples"]] == ["p1", "p2", "p3"]


def test_start_cache_must_match_the_inquiries(tmp_path: Path) -> None:
    from cl_bench.evaluation.probes import load_start

    torch.save({"ids": ["a"], "answers": ["x"], "hidden": [torch.zeros(1, 2)]}, tmp_path / "s.pt")
    assert load_start(tmp_path / "s.pt", ["a"]).answers == ["x"]
    with pytest.raises(CLBenchError, match="other inquiries"):
        load_start(tmp_path / "s.pt", ["b"])
    with pytest.raises(CLBenchError, match="not probed"):
        load_start(tmp_path / "missing.pt", ["a"])
