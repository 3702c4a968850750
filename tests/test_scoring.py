"""Scorers for every answer type, with adversarial predictions; matched by question id."""

from __future__ import annotations

import random

import pytest

from cl_bench.errors import CLBenchError
from tasks.captions import CAPTION_METRICS
from tasks.scoring import (
    SCORERS,
    TaskScore,
    extract_option_letter,
    iou,
    normalize_vqa_answer,
    parse_box,
    read_integer,
    score_task,
    vqa_accuracy,
    vqa_accuracy_min3,
)

# ---------------------------------------------------------------- option letters


@pytest.mark.parametrize(
    "text, letter",
    [
        ("B", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("B)", "B"),
        (" b ", "B"),  # a lone lower-case letter counts
        ("(c)", "C"),
        ("The answer is B", "B"),
        ("The answer is B.", "B"),
        ("The correct answer is (B) cat.", "B"),
        ("Answer: C", "C"),
        ("Option D is correct.", "D"),
        ("B. Vitamin C", "B"),  # a leading option marker wins over letters in the option text
        ("I think B", "B"),  # the pronoun "I" is no option
        ("B is correct", "B"),
        ("", None),
        ("   ", None),
        ("A or B", None),  # several different letters: wrong
        ("A, B", None),
        ("B and C", None),
        ("The answer is B or C", None),
        ("The answer is A. No, the answer is C.", None),  # two phrases, two letters
        ("(B), (C)", None),
        ("B. or C.", None),
        ("it is a cat", None),  # the word "a" in a sentence is not option A
        ("The answer is a dog", None),
        ("A cat", None),  # nor the article "A"
        ("AB", None),
        ("X-ray", None),
        ("cat", None),
        ("1", None),  # digits are indices only for index references
    ],
)
def test_extract_option_letter(text: str, letter: str | None) -> None:
    assert extract_option_letter(text) == letter


@pytest.mark.parametrize(
    "text, letter",
    [("1", "B"), ("0.", "A"), ("(2)", "C"), ("1. dog", "B"), ("The answer is 3", "D"), ("B", "B")],
)
def test_extract_option_index(text: str, letter: str) -> None:
    assert extract_option_letter(text, allow_index=True) == letter


def test_option_scoring() -> None:
    refs = {"q1": ["B"], "q2": ["C"], "q3": ["A"], "q4": ["D"], "q5": ["B"], "q6": ["A"]}
    preds = {
        "q1": "The answer is B.",  # right
        "q2": "c",  # right
        "q3": "A or B",  # several letters: wrong
        "q4": "",  # empty: wrong
        "q5": "(B) a cat",  # right
        "q6": "a",  # right: a lone letter
    }
    result = score_task("option", preds, refs)
    assert result.per_sample == {"q1": 1.0, "q2": 1.0, "q3": 0.0, "q4": 0.0, "q5": 1.0, "q6": 1.0}
    assert result.score == pytest.approx(400 / 6)
    assert result.rule == "exact"


def test_option_scoring_accepts_iconqa_indices() -> None:
    # IconQA: options "0. ...", "1. ..." with the index as the answer; index i is letter chr(65+i)
    refs = {"a": ["1"], "b": ["1"], "c": ["0"], "d": ["2"], "e": ["1"]}
    preds = {"a": "B", "b": "1", "c": "0. circle", "d": "B", "e": ""}
    result = score_task("option", preds, refs)
    assert result.per_sample == {"a": 1.0, "b": 1.0, "c": 1.0, "d": 0.0, "e": 0.0}


def test_digit_prediction_against_a_letter_reference_is_wrong() -> None:
    assert score_task("option", {"q": "1"}, {"q": ["B"]}).score == 0.0


def test_option_rules_agree_on_letters() -> None:
    refs, preds = {"q": ["B"], "r": ["C"]}, {"q": "The answer is B", "r": "B"}
    for rule in ("exact", "pred_in_gt", "gt_in_pred"):
        result = score_task("option", preds, refs, rule)
        assert result.score == 50.0 and result.rule == rule


def test_bad_option_reference_names_the_question() -> None:
    with pytest.raises(CLBenchError, match="question 'q7'.*neither a letter nor an index"):
        score_task("option", {"q7": "B"}, {"q7": ["banana"]})


# ---------------------------------------------------------------- single words


@pytest.mark.parametrize(
    "pred, gt, rule, correct",
    [
        (" dog ", "Dog", "exact", True),
        ("dogs", "dog", "exact", False),
        ("The answer is dog", "dog", "exact", False),
        ("", "dog", "exact", False),
        ("", "", "exact", False),  # empty is never correct
        ("cat", "wildcat", "pred_in_gt", True),
        ("wildcat", "cat", "pred_in_gt", False),
        ("", "dog", "pred_in_gt", False),
        ("  ", "dog", "pred_in_gt", False),
        ("The answer is dog.", "Dog", "gt_in_pred", True),
        ("do", "dog", "gt_in_pred", False),
        ("", "dog", "gt_in_pred", False),
        ("dog", "", "gt_in_pred", False),
    ],
)
def test_word_rules(pred: str, gt: str, rule: str, correct: bool) -> None:
    result = score_task("word", {"q": pred}, {"q": [gt]}, rule)
    assert result.per_sample == {"q": float(correct)}
    assert result.rule == rule


def test_word_matches_any_reference() -> None:
    result = score_task("word", {"q": "puppy"}, {"q": ["dog", "PUPPY"]})
    assert result.score == 100.0


# ---------------------------------------------------------------- VQA


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("Two.", "2"),
        ("2.", "2"),
        ("3.5", "3.5"),
        ("The Dog", "dog"),
        ("an apple", "apple"),
        ("dont", "don't"),
        ("yes, it is!", "yes it is"),
        ("1,000", "1000"),
        ("red/blue", "red blue"),
        ("none", "0"),
    ],
)
def test_normalize_vqa_answer(raw: str, normalised: str) -> None:
    assert normalize_vqa_answer(raw) == normalised


def test_vqa_accuracy_with_ten_human_answers() -> None:
    humans = ["Two", "2", "two.", "3", "three", "2 ", "a dog", "dog", "the dog", "Dogs"]
    # normalised: 2, 2, 2, 3, 3, 2, dog, dog, dog, dogs
    refs = {"q1": humans, "q2": humans, "q3": humans, "q4": humans, "q5": humans}
    preds = {"q1": "2", "q2": "Three", "q3": "dogs", "q4": "The dog.", "q5": "cat"}
    # Official: mean over the 10 leave-one-out sets of min(matches among the other 9 / 3, 1).
    # q1: 4 said "2": leaving out a "2" leaves 3 -> 1, any other leaves 4 -> 1; mean 1
    # q2: 2 said "3": (2 * min(1/3, 1) + 8 * min(2/3, 1)) / 10 = (2/3 + 16/3) / 10 = 0.6
    # q3: 1 said "dogs": (1 * 0 + 9 * 1/3) / 10 = 0.3
    # q4: 3 said "dog": (3 * 2/3 + 7 * 1) / 10 = 0.9; q5: 0
    # Score = 100 * (1 + 0.6 + 0.3 + 0.9 + 0) / 5 = 56
    result = score_task("vqa", preds, refs)
    assert result.per_sample == pytest.approx(
        {"q1": 1.0, "q2": 0.6, "q3": 0.3, "q4": 0.9, "q5": 0.0}
    )
    assert result.score == pytest.approx(56.0)
    assert result.rule == "vqa_official"
    # The simplified form, beside it: min(matches / 3, 1) over all 10
    # = 100 * (1 + 2/3 + 1/3 + 1 + 0) / 5 = 60
    assert result.details == pytest.approx({"vqa_official": 56.0, "vqa_min3": 60.0})


@pytest.mark.parametrize(
    "matching, official, simple",
    # n = 10 answers, m matching: official = (m * min((m-1)/3, 1) + (10-m) * min(m/3, 1)) / 10
    [(0, 0.0, 0.0), (1, 0.3, 1 / 3), (2, 0.6, 2 / 3), (3, 0.9, 1.0), (4, 1.0, 1.0),
     (10, 1.0, 1.0)],
)
def test_official_vqa_accuracy_leaves_each_answer_out(
    matching: int, official: float, simple: float
) -> None:
    humans = ["cat"] * matching + ["dog"] * (10 - matching)
    assert vqa_accuracy("Cat", humans) == pytest.approx(official)
    assert vqa_accuracy_min3("Cat", humans) == pytest.approx(simple)


@pytest.mark.parametrize(
    "raw, normalised",
    [("couldnt've", "couldn't've"), ("couldn'tve", "couldn't've"), ("Im", "i'm"),
     ("twas", "'twas")],
)
def test_contractions_missing_some_apostrophes(raw: str, normalised: str) -> None:
    assert normalize_vqa_answer(raw) == normalised


@pytest.mark.parametrize("accuracy", [vqa_accuracy, vqa_accuracy_min3])
def test_vqa_single_reference_is_exact_match(accuracy) -> None:
    assert accuracy("The Cat.", ["cat"]) == 1.0
    assert accuracy("cats", ["cat"]) == 0.0
    assert accuracy("", [""]) == 0.0  # empty never correct
    assert accuracy("", ["a", "the"]) == 0.0


# ---------------------------------------------------------------- lenient numbers


@pytest.mark.parametrize(
    "text, number",
    [("3", 3), (" 3. ", 3), ("three", 3), ("Twenty-one", 21), ("ninety nine", 99), ("1,000", 1000),
     ("3.0", 3), ("-2", -2), ("3.5", None), ("none", None), ("a 3", None), ("", None),
     ("3 cubes", None)],
)
def test_read_integer(text: str, number: int | None) -> None:
    assert read_integer(text) == number


def test_lenient_numbers_are_reported_beside_the_exact_score() -> None:
    refs = {f"q{i}": [r] for i, r in enumerate(["3", "3", "3", "3", "10", "cube", "cube", "0"])}
    preds = dict(zip(refs, ["3", "4", "5", "three", "nine.", "cube", "sphere", ""], strict=True))
    # exact: q0, q5 -> 2 / 8 = 25; lenient adds q1 (off by one), q3 ("three" = 3), q4 (9 vs 10):
    # 5 / 8 = 62.5 (q2 is off by two, q6 a wrong word, q7 empty)
    result = score_task("word", preds, refs)
    assert result.score == pytest.approx(25.0)
    assert result.per_sample["q1"] == 0.0  # the exact score is never replaced
    assert result.details == {"numeric_lenient": pytest.approx(62.5)}
    words = score_task("word", {"q": "cat"}, {"q": ["dog"]})
    assert words.details == {}  # no whole-number reference: no lenient score


# ---------------------------------------------------------------- boxes


@pytest.mark.parametrize(
    "text, box",
    [
        ("[0.12, 0.34, 0.56, 0.78]", (0.12, 0.34, 0.56, 0.78)),
        ("The box is [123, 456, 789, 999].", (123.0, 456.0, 789.0, 999.0)),  # no digit dropped
        ("[10,20,30,40] and [0, 0, 1, 1]", (10.0, 20.0, 30.0, 40.0)),  # the first box
        ("[1, 2, 3]", None),
        ("[1, 2, 3, 4, 5]", None),
        ("1, 2, 3, 4", None),
        ("[a, b, c, d]", None),
        ("[0.5, 0.5, 0.1, 0.9]", None),  # x2 < x1
        ("", None),
    ],
)
def test_parse_box(text: str, box: tuple | None) -> None:
    assert parse_box(text) == box


def test_iou() -> None:
    assert iou((0, 0, 2, 2), (0, 0, 2, 2)) == 1.0
    assert iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    # [0,0,2,1] (area 2) and [0,0,1,1] (area 1): intersection 1, union 2 -> 0.5
    assert iou((0, 0, 2, 1), (0, 0, 1, 1)) == 0.5
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_box_scoring_is_strictly_above_half() -> None:
    refs = {q: ["[0, 0, 1, 1]"] for q in "abcde"}
    preds = {
        "a": "[0, 0, 2, 1]",  # IoU exactly 0.5: wrong (strict >)
        "b": "[0, 0, 1.9, 1]",  # IoU 1 / 1.9 ~ 0.526: right
        "c": "[0, 0, 1, 1] is the box",  # right
        "d": "[0, 0, 1]",  # malformed: wrong
        "e": "",  # empty: wrong
    }
    result = score_task("bbox", preds, refs)
    assert result.per_sample == {"a": 0.0, "b": 1.0, "c": 1.0, "d": 0.0, "e": 0.0}
    assert result.rule == "iou>0.5"


def test_malformed_box_reference_is_an_error() -> None:
    with pytest.raises(CLBenchError, match="question 'q'.*x1, y1, x2, y2"):
        score_task("bbox", {"q": "[0, 0, 1, 1]"}, {"q": ["0 0 1 1"]})


# ---------------------------------------------------------------- yes / no


def test_yesno_scoring() -> None:
    refs = {"a": ["yes"], "b": ["no"], "c": ["Yes"], "d": ["yes"], "e": ["no"], "f": ["yes"]}
    preds = {
        "a": "Yes, there is a dog.",  # right
        "b": "No.",  # right
        "c": "yes",  # right
        "d": "no",  # wrong
        "e": "",  # empty: wrong
        "f": "yesterday",  # wrong: the whole first word must be "yes"
    }
    result = score_task("yesno", preds, refs)
    assert result.per_sample == {"a": 1.0, "b": 1.0, "c": 1.0, "d": 0.0, "e": 0.0, "f": 0.0}
    assert result.score == pytest.approx(50.0)


# ---------------------------------------------------------------- ids, errors, order


def test_shuffled_dicts_give_the_same_score() -> None:
    rng = random.Random(0)
    humans = ["two", "2", "3", "three", "3", "dog", "dog", "cat", "2", "4"]
    cases = {
        "option": ({f"q{i}": "ABCD"[i % 4] for i in range(40)}, lambda i: ["ABCD"[i * 7 % 4]]),
        "word": ({f"q{i}": ["dog", "cat"][i % 2] for i in range(40)}, lambda i: ["dog"]),
        "vqa": ({f"q{i}": ["2", "3", "dog", "4"][i % 4] for i in range(40)}, lambda i: humans),
    }
    for answer_type, (preds, make_refs) in cases.items():
        refs = {f"q{i}": make_refs(i) for i in range(40)}
        base = score_task(answer_type, preds, refs)
        pred_items, ref_items = list(preds.items()), list(refs.items())
        rng.shuffle(pred_items)
        rng.shuffle(ref_items)
        shuffled = score_task(answer_type, dict(pred_items), dict(ref_items))
        assert shuffled.score == base.score
        assert shuffled.per_sample == base.per_sample
        assert 0.0 < base.score < 100.0


def test_unknown_answer_type_names_the_valid_ones() -> None:
    with pytest.raises(CLBenchError, match="unknown answer type 'opton'.*Did you mean 'option'"):
        score_task("opton", {"q": "A"}, {"q": ["A"]})
    with pytest.raises(CLBenchError, match="bbox, caption, option, vqa, word, yesno"):
        score_task("nope", {"q": "A"}, {"q": ["A"]})


def test_unknown_rule_names_the_valid_ones() -> None:
    with pytest.raises(CLBenchError, match="unknown matching rule 'fuzzy'.*exact, gt_in_pred"):
        score_task("word", {"q": "A"}, {"q": ["A"]}, "fuzzy")


def test_missing_predictions_are_counted_and_named() -> None:
    refs = {f"q{i}": ["A"] for i in range(10)}
    preds = {"q0": "A", "q1": "A"}
    with pytest.raises(CLBenchError, match=r"8 of 10 questions have no prediction .*'q2', 'q3'"):
        score_task("option", preds, refs)


def test_extra_predictions_are_an_error() -> None:
    with pytest.raises(CLBenchError, match=r"1 predictions have no reference \(ids 'zz'\)"):
        score_task("word", {"q": "A", "zz": "B"}, {"q": ["A"]})


def test_empty_inputs_are_errors() -> None:
    with pytest.raises(CLBenchError, match="no references"):
        score_task("word", {}, {})
    with pytest.raises(CLBenchError, match="no reference answer"):
        score_task("word", {"q": "A"}, {"q": []})


def test_a_plain_string_reference_is_one_reference() -> None:
    assert score_task("word", {"q": "dog"}, {"q": "dog"}).score == 100.0


def test_registry_covers_every_answer_type() -> None:
    assert sorted(SCORERS.names()) == ["bbox", "caption", "option", "vqa", "word", "yesno"]


# ---------------------------------------------------------------- captions (starts Java twice)


def test_caption_scores_identical_captions_above_wrong_ones() -> None:
    refs = {
        "c1": ["a red square on a black background", "a red box"],
        "c2": ["a blue circle next to a green square"],
        "c3": ["two dogs playing in the snow", "dogs play in snow"],
    }
    right = {q: r[0] for q, r in refs.items()}
    wrong = {"c1": "a man riding a horse", "c2": "", "c3": "a plate of food on a table"}
    good = score_task("caption", right, refs)
    bad = score_task("caption", dict(reversed(list(wrong.items()))), refs)
    assert isinstance(good, TaskScore) and good.rule == "coco_caption"
    assert list(good.details) == list(CAPTION_METRICS)
    assert good.details["Bleu_1"] == pytest.approx(100.0)
    assert good.score == pytest.approx(sum(good.details.values()) / 7)
    assert good.score > bad.score >= 0.0
    assert good.per_sample == {}


def test_caption_metrics_keep_each_caption_on_its_question() -> None:
    # A line break or Unicode line separator inside a caption used to split it in two for the
    # PTB tokenizer and shift every later caption onto the wrong question, silently.
    refs = {
        "a": ["a red square\r\non white"], "b": ["a blue\u2028circle"], "c": ["two green dogs"],
    }
    preds = {"a": "a red square on white", "b": "a blue circle", "c": "two green dogs"}
    result = score_task("caption", preds, refs)
    assert result.notes == ()
    assert result.details["Bleu_1"] == pytest.approx(100.0)
    assert result.details["METEOR"] == pytest.approx(100.0, abs=1.0)


def test_an_empty_prediction_set_gives_a_score() -> None:
    refs = {"a": ["a red square"], "b": ["a blue circle", "one blue circle"]}
    result = score_task("caption", {"a": "", "b": "   "}, refs)
    assert result.notes == ()
    assert all(v is not None for v in result.details.values())
    assert result.score == pytest.approx(0.0, abs=1e-6)
