"""Scoring of a task's predictions against its references, matched by question id.

``score_task(answer_type, predictions, references, rule)`` dispatches on the answer type:

- ``option``: the option letter the model answered (see ``extract_option_letter``); references
  are letters ("B") or, IconQA-style, indices ("1" = option B, whose prediction may also be "1").
- ``word``: a single word or phrase under one of the three rules of ``WORD_RULES``; when
  references are whole numbers, a lenient numeric score (off by one counts) is in the details.
- ``vqa``: the official VQA accuracy (the mean over the leave-one-out subsets of the human
  answers of min(#matches / 3, 1)) after the standard VQA normalisation, or exact normalised match
  when there is a single reference; the simplified min(#matches / 3, 1) is in the details.
- ``bbox``: referring-expression grounding, correct when IoU > 0.5 (strict).
- ``caption``: mean of Bleu-1..4, METEOR, ROUGE-L and CIDEr (pycocoevalcap), times 100; a metric
  that fails is marked (None in the details, a note) and the score is the mean of the others.
- ``yesno``: the first word of the prediction equals the reference ("yes" / "no").

The ``rule`` argument (``exact``, ``pred_in_gt``, ``gt_in_pred``) applies to ``word`` and
``option`` answers; it is validated for every type, and ``TaskScore.rule`` names the matching rule
actually used (e.g. ``"iou>0.5"`` for boxes).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from cl_bench.errors import CLBenchError
from cl_bench.registry import Registry, unknown_name_error
from tasks.captions import caption_metrics


@dataclass(frozen=True)
class TaskScore:
    """A task's score, per-question scores (0..1, by id), extra metrics, the matching rule and
    notes on how the score was made when something could not be computed.

    ``score`` is a percentage; a caption score can pass 100, as CIDEr (times 100) ranges to 1000.
    ``details`` holds other views of the same predictions (percentages), never replacing the
    score: e.g. ``vqa_min3`` beside the official VQA accuracy, ``numeric_lenient`` beside an
    exact match; a metric that failed is None there and explained in ``notes``.
    """

    score: float
    per_sample: dict[str, float] = field(default_factory=dict)
    details: dict[str, float | None] = field(default_factory=dict)
    rule: str = "exact"
    notes: tuple[str, ...] = ()


References = dict[str, list[str]]
Scorer = Callable[[dict[str, str], References, str], TaskScore]
SCORERS: Registry[Scorer] = Registry("answer type")


# ---------------------------------------------------------------- word rules


def match_exact(pred: str, gt: str) -> bool:
    """Stripped, upper-cased and equal (the reference code behind the published UCIT numbers)."""
    pred = pred.strip().upper()
    return bool(pred) and pred == gt.strip().upper()


def match_pred_in_gt(pred: str, gt: str) -> bool:
    """The prediction is a substring of the reference (HiDe appendix G's text)."""
    pred = pred.strip().upper()
    return bool(pred) and pred in gt.strip().upper()


def match_gt_in_pred(pred: str, gt: str) -> bool:
    """The reference is a substring of the prediction."""
    pred, gt = pred.strip().upper(), gt.strip().upper()
    return bool(pred) and bool(gt) and gt in pred


WORD_RULES: dict[str, Callable[[str, str], bool]] = {
    "exact": match_exact,
    "pred_in_gt": match_pred_in_gt,
    "gt_in_pred": match_gt_in_pred,
}


# ---------------------------------------------------------------- option letters

_NOT_A_LIST = r"(?!\s*(?:[,/&]|(?i:or|and)\b))"  # "B or C", "(B), (C)": several options
_WHOLE_LETTER = re.compile(r"^\(?([A-Za-z])\)?[.):]?$")
_WHOLE_INDEX = re.compile(r"^\(?(\d{1,2})\)?[.):]?$")
_LEADING_LETTER = re.compile(r"^(?:\(([A-Za-z])\)|([A-Z])[.):])(?=\s|$)" + _NOT_A_LIST)
_LEADING_INDEX = re.compile(r"^(?:\((\d{1,2})\)|(\d{1,2})[.):])(?=\s|$)" + _NOT_A_LIST)
_PHRASE = re.compile(
    r"\b(?i:answer|option|choice)\b(?:\s+is)?\s*:?\s*(?:\(([A-Za-z0-9]{1,2})\)|([A-Z]|\d{1,2}))"
    r"(?![\w'-])" + _NOT_A_LIST
)
_LETTER_TOKEN = re.compile(r"(?<![\w'-])(?:\(([A-Za-z])\)|([A-Z]))(?![\w'-])")
_ARTICLE_OR_PRONOUN = re.compile(r"\s+(?!(?:or|and|is)\b)[a-z]")


def index_to_letter(index: int) -> str | None:
    """Option index 0, 1, ... as its letter A, B, ... (None beyond Z)."""
    return chr(65 + index) if 0 <= index < 26 else None


def _as_letter(token: str, allow_index: bool) -> str | None:
    if token.isdigit():
        return index_to_letter(int(token)) if allow_index else None
    return token.upper() if len(token) == 1 and token.isalpha() else None


def _scan_letters(text: str) -> set[str]:
    """Stand-alone capitals and bracketed letters, except the article "A" and pronoun "I"."""
    found = set()
    for m in _LETTER_TOKEN.finditer(text):
        letter = m.group(1) or m.group(2)
        is_word = m.group(2) in ("A", "I") and _ARTICLE_OR_PRONOUN.match(text, m.end())
        if not is_word:
            found.add(letter.upper())
    return found


def extract_option_letter(text: str, allow_index: bool = False) -> str | None:
    """The option letter a free-form answer names, or None when it names none or several.

    Read, in order: the whole answer as one letter in any case ("B", "b", "B.", "(b)", "B)");
    a leading option marker ("B. cat", "(B) cat"); a phrase ("The answer is B", "Answer: (C)",
    "option D"); else every stand-alone capital or bracketed letter, which must all agree ("A or
    B" is None). A lower-case letter counts only alone or in brackets, and "A"/"I" followed by a
    lower-case word are read as the article and pronoun, so "a" in "it is a cat" and "A" in "A
    cat" are not option A. With ``allow_index`` a number ("1", "1. dog", "The answer is 1")
    is read as an index, 1 meaning B (IconQA lists options as "0. ...", "1. ...").
    """
    text = " ".join(text.split())
    if not text:
        return None
    whole = _WHOLE_LETTER.match(text) or (allow_index and _WHOLE_INDEX.match(text))
    if whole:
        return _as_letter(whole.group(1), allow_index)
    leading = _LEADING_LETTER.match(text) or (allow_index and _LEADING_INDEX.match(text))
    if leading:
        return _as_letter(leading.group(1) or leading.group(2), allow_index)
    phrased = {_as_letter(m.group(1) or m.group(2), allow_index) for m in _PHRASE.finditer(text)}
    phrased.discard(None)
    if phrased:
        return phrased.pop() if len(phrased) == 1 else None
    letters = _scan_letters(text)
    return letters.pop() if len(letters) == 1 else None


def reference_letter(reference: str) -> tuple[str, bool]:
    """A reference option as (letter, given as an index?); "1" -> ("B", True)."""
    ref = reference.strip()
    if ref.isdigit():
        letter = index_to_letter(int(ref))
        if letter:
            return letter, True
    letter = extract_option_letter(ref)
    if letter is None:
        raise CLBenchError(f"option reference {reference!r} is neither a letter nor an index")
    return letter, False


def option_correct(pred: str, refs: Sequence[str], rule: str) -> bool:
    """The letter read from ``pred`` matches one reference letter under ``rule``."""
    match = WORD_RULES[rule]
    for ref in refs:
        letter, is_index = reference_letter(ref)
        answered = extract_option_letter(pred, allow_index=is_index)
        if answered is not None and match(answered, letter):
            return True
    return False


# ---------------------------------------------------------------- VQA normalisation

_CONTRACTION_TEXT = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've "
    "hasn't haven't he'd he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've "
    "it'll let's ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock "
    "oughtn't shan't she'd've she's should've shouldn't shouldn't've somebody'd somebody'll "
    "somebody's someone'd someone'll someone's something'd something'll that's there'd "
    "there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've "
    "we've weren't what'll what're what's what've when's where'd where's where've who'd who'll "
    "who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'd've you'd "
    "you'd've you'll you're you've"
)


def _contraction_spellings(contraction: str) -> list[str]:
    """Spellings of a contraction that drop every apostrophe, or one of several."""
    spots = [i for i, ch in enumerate(contraction) if ch == "'"]
    one_dropped = [contraction[:i] + contraction[i + 1 :] for i in spots] if len(spots) > 1 else []
    return [contraction.replace("'", ""), *one_dropped]


CONTRACTIONS = {
    spelling: c for c in _CONTRACTION_TEXT.split() for spelling in _contraction_spellings(c)
}
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
NUMBER_WORDS = {w: str(i) for i, w in enumerate(_NUMBERS)}
NUMBER_WORDS["none"] = "0"
ARTICLES = frozenset({"a", "an", "the"})
_PUNCT = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")


def normalize_vqa_answer(text: str) -> str:
    """The standard VQA evaluation's answer normalisation, written afresh.

    Punctuation is deleted when it touches a space or the answer has a digit-comma-digit ("1,000"),
    else replaced by a space; periods not followed by a digit go; then lower case, number words to
    digits ("two" -> "2", "none" -> "0"), articles dropped and apostrophe-less contractions
    restored ("dont" -> "don't").
    """
    original = " ".join(text.split())
    text = original
    for p in _PUNCT:
        glued = f"{p} " in original or f" {p}" in original or _DIGIT_COMMA.search(original)
        text = text.replace(p, "" if glued else " ")
    text = _PERIOD.sub("", text)
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_accuracy(pred: str, refs: Sequence[str]) -> float:
    """The official VQA accuracy: with n > 1 human answers, the mean over the n ways of leaving one
    answer out of min(#remaining answers equal to the prediction / 3, 1); with one, 0 or 1.

    Answers and prediction are normalised alike (``normalize_vqa_answer``); answers are left out
    by position, so duplicates count (10 answers, 3 matching: (3 * 2/3 + 7 * 1) / 10 = 0.9).
    """
    # Antol et al. 2015 (VQA) Sec. 2: min(#humans that said ans / 3, 1), averaged over all
    # 10-choose-9 sets of human annotators (the official evaluation code, vqaEval.py)
    answer = normalize_vqa_answer(pred)
    if not answer:
        return 0.0
    n = len(refs)
    matches = sum(normalize_vqa_answer(r) == answer for r in refs)
    if n == 1:
        return float(matches == 1)
    # leaving out one of the matching answers leaves matches - 1; any other leaves matches
    left_matching = matches * min((matches - 1) / 3, 1.0)
    left_other = (n - matches) * min(matches / 3, 1.0)
    return (left_matching + left_other) / n


def vqa_accuracy_min3(pred: str, refs: Sequence[str]) -> float:
    """The simplified VQA accuracy min(#answers equal to the prediction / 3, 1) over all answers
    (0 or 1 with one answer): 3 of 10 matching give 1.0 where the official form gives 0.9."""
    answer = normalize_vqa_answer(pred)
    if not answer:
        return 0.0
    matches = sum(normalize_vqa_answer(r) == answer for r in refs)
    return min(matches / 3, 1.0) if len(refs) > 1 else float(matches > 0)


# ---------------------------------------------------------------- lenient numbers

_UNITS = (*_NUMBERS, "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
          "seventeen", "eighteen", "nineteen")
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70,
         "eighty": 80, "ninety": 90}
_NUMBER_TEXT = {w: i for i, w in enumerate(_UNITS)} | _TENS | {
    f"{tens}{sep}{unit}": value + k
    for tens, value in _TENS.items() for k, unit in enumerate(_NUMBERS[1:10], 1)
    for sep in ("-", " ")
}
_INTEGER = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+|[+-]?\d+(?:\.0+)?")


def read_integer(text: str) -> int | None:
    """The whole number an answer is, in digits ("3", "3.", "1,000", "-2") or English words up
    to ninety-nine ("three", "twenty-one"); None when the answer is anything else."""
    words = " ".join(text.strip().strip(".!").lower().split())
    if words in _NUMBER_TEXT:
        return _NUMBER_TEXT[words]
    if _INTEGER.fullmatch(words):
        return int(float(words.replace(",", "")))
    return None


def numeric_lenient(pred: str, refs: Sequence[str], match: Callable[[str, str], bool]) -> bool:
    """Correct under ``match``, or an integer answer within 1 of an integer reference."""
    if any(match(pred, r) for r in refs):
        return True
    answer = read_integer(pred)
    return answer is not None and any(
        (ref := read_integer(r)) is not None and abs(answer - ref) <= 1 for r in refs
    )


# ---------------------------------------------------------------- boxes

Box = tuple[float, float, float, float]
_NUM = r"\s*(-?(?:\d+(?:\.\d*)?|\.\d+))\s*"
_BOX = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")


def parse_box(text: str) -> Box | None:
    """The first "[x1, y1, x2, y2]" in ``text`` (all digits kept), or None if absent or inverted."""
    m = _BOX.search(text)
    if m is None:
        return None
    x1, y1, x2, y2 = (float(v) for v in m.groups())
    return (x1, y1, x2, y2) if x2 >= x1 and y2 >= y1 else None


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two corner boxes (0 when the union has no area)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def box_correct(pred: str, refs: Sequence[str]) -> bool:
    """The predicted box overlaps one reference box with IoU > 0.5 (strict, as CoIN's code)."""
    box = parse_box(pred)
    if box is None:
        return False
    for ref in refs:
        ref_box = parse_box(ref)
        if ref_box is None:
            raise CLBenchError(f"box reference {ref!r} is not of the form [x1, y1, x2, y2]")
        if iou(box, ref_box) > 0.5:
            return True
    return False


# ---------------------------------------------------------------- yes / no


def first_word(text: str) -> str:
    """The first word, lower-cased, without surrounding punctuation ("Yes, it is" -> "yes")."""
    for word in text.lower().split():
        word = word.strip(".,;:!?\"'()[]")
        if word:
            return word
    return ""


def yesno_correct(pred: str, refs: Sequence[str]) -> bool:
    """The prediction's first word equals one reference's first word."""
    answer = first_word(pred)
    return bool(answer) and any(answer == first_word(r) for r in refs)


# ---------------------------------------------------------------- scorers by answer type


def _per_question(
    predictions: dict[str, str], references: References, correct: Callable[[str, list[str]], float]
) -> dict[str, float]:
    """``correct(prediction, references)`` for every question id; errors name the id."""
    scores = {}
    for qid, refs in references.items():
        try:
            scores[qid] = float(correct(predictions[qid], refs))
        except CLBenchError as err:
            raise CLBenchError(f"question {qid!r}: {err}") from None
    return scores


def _from_samples(per_sample: dict[str, float], rule: str) -> TaskScore:
    score = 100.0 * math.fsum(per_sample.values()) / len(per_sample)
    return TaskScore(score, per_sample, {}, rule)


@SCORERS.register("option")
def score_options(predictions: dict[str, str], references: References, rule: str) -> TaskScore:
    """Option letters (or IconQA indices), compared under ``rule``."""
    per_sample = _per_question(
        predictions, references, lambda pred, refs: option_correct(pred, refs, rule)
    )
    return _from_samples(per_sample, rule)


@SCORERS.register("word")
def score_words(predictions: dict[str, str], references: References, rule: str) -> TaskScore:
    """A single word or phrase, correct when it matches one reference under ``rule``.

    When some references are whole numbers, ``details["numeric_lenient"]`` also counts an
    integer answer off by one (digits and number words alike) as correct: reported beside the
    score, never in its place.
    """
    match = WORD_RULES[rule]
    per_sample = _per_question(
        predictions, references, lambda pred, refs: any(match(pred, r) for r in refs)
    )
    score = _from_samples(per_sample, rule)
    if not any(read_integer(r) is not None for refs in references.values() for r in refs):
        return score
    lenient = _per_question(
        predictions, references, lambda pred, refs: numeric_lenient(pred, refs, match)
    )
    details = {"numeric_lenient": _from_samples(lenient, rule).score}
    return TaskScore(score.score, per_sample, details, rule)


@SCORERS.register("vqa")
def score_vqa(predictions: dict[str, str], references: References, rule: str) -> TaskScore:
    """The official VQA accuracy over human answers (``rule`` does not apply); the simplified
    min(#matches / 3, 1) is ``details["vqa_min3"]``."""
    official = _per_question(predictions, references, vqa_accuracy)
    simple = _from_samples(_per_question(predictions, references, vqa_accuracy_min3), "")
    score = _from_samples(official, "vqa_official")
    details = {"vqa_official": score.score, "vqa_min3": simple.score}
    return TaskScore(score.score, official, details, "vqa_official")


@SCORERS.register("bbox")
def score_boxes(predictions: dict[str, str], references: References, rule: str) -> TaskScore:
    """Referring-expression grounding by IoU (``rule`` does not apply)."""
    return _from_samples(_per_question(predictions, references, box_correct), "iou>0.5")


@SCORERS.register("yesno")
def score_yesno(predictions: dict[str, str], references: References, rule: str) -> TaskScore:
    """Yes/no accuracy on the prediction's first word (``rule`` does not apply)."""
    return _from_samples(_per_question(predictions, references, yesno_correct), "first_word")


@SCORERS.register("caption")
def score_captions(predictions: dict[str, str], references: References, rule: str) -> TaskScore:
    """Mean of Bleu-1..4, METEOR, ROUGE-L and CIDEr, times 100 (HiDe appendix G); no SPICE.

    A metric that fails (``tasks.captions``) is None in the details, and the score is the mean
    of the metrics that worked, with a note naming the gap.
    """
    values, notes = caption_metrics(predictions, references)
    details = {k: None if v is None else 100.0 * v for k, v in values.items()}
    worked = [v for v in details.values() if v is not None]
    if not worked:
        raise CLBenchError(f"no caption metric could be computed: {'; '.join(notes)}")
    failed = [k for k, v in details.items() if v is None]
    if failed:
        notes.append(
            f"caption score = mean of {len(worked)} of {len(details)} metrics ({', '.join(failed)} "
            "failed): not comparable with scores over all seven"
        )
    return TaskScore(sum(worked) / len(worked), {}, details, "coco_caption", tuple(notes))


# ---------------------------------------------------------------- entry point


def _id_list(ids: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (", ..." if len(ids) > limit else "")


def check_inputs(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> tuple[dict[str, str], References]:
    """Predictions and references as plain dicts with the same question ids, else an error."""
    if not references:
        raise CLBenchError("no references to score: the task's test set is empty")
    refs = {
        str(q): [r] if isinstance(r, str) else [str(x) for x in r] for q, r in references.items()
    }
    preds = {str(q): "" if p is None else str(p) for q, p in predictions.items()}
    missing = [q for q in refs if q not in preds]
    if missing:
        raise CLBenchError(
            f"{len(missing)} of {len(refs)} questions have no prediction (ids {_id_list(missing)})"
        )
    extra = [q for q in preds if q not in refs]
    if extra:
        raise CLBenchError(
            f"{len(extra)} predictions have no reference (ids {_id_list(extra)}): predictions and "
            f"references must cover the same question ids"
        )
    empty = [q for q, r in refs.items() if not r]
    if empty:
        raise CLBenchError(
            f"{len(empty)} questions have no reference answer (ids {_id_list(empty)})"
        )
    return preds, refs


def score_task(
    answer_type: str,
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    rule: str = "exact",
) -> TaskScore:
    """Score predictions against references, both keyed by question id (order never matters).

    ``references`` maps each id to its reference answers (a single string is one reference).
    Raises CLBenchError for an unknown answer type or rule, or when the ids differ.
    """
    scorer = SCORERS.get(answer_type)
    if rule not in WORD_RULES:
        raise unknown_name_error("matching rule", rule, list(WORD_RULES))
    preds, refs = check_inputs(predictions, references)
    try:
        return scorer(preds, refs, rule)
    except CLBenchError as err:
        raise CLBenchError(f"scoring {answer_type!r} answers: {err}") from None
