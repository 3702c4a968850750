"""Scoring of a task's predictions against its references, matched by question id.

``score_task(answer_type, predictions, references, rule)`` dispatches on the answer type:

- ``option``: the option letter the model answered (see ``extract_option_letter``); references
  are letters ("B") or, IconQA-style, indices ("1" = option B, whose prediction may also be "1").
- ``word``: a single word or phrase under one of the three rules of ``WORD_RULES``.
- ``vqa``: VQA accuracy min(#references equal to the prediction / 3, 1) after the standard VQA
  normalisation, or exact normalised match when there is a single reference.
- ``bbox``: referring-expression grounding, correct when IoU > 0.5 (strict).
- ``caption``: mean of Bleu-1..4, METEOR, ROUGE-L and CIDEr (pycocoevalcap), times 100.
- ``yesno``: the first word of the prediction equals the reference ("yes" / "no").

The ``rule`` argument (``exact``, ``pred_in_gt``, ``gt_in_pred``) applies to ``word`` and
``option`` answers; it is validated for every type, and ``TaskScore.rule`` names the matching rule
actually used (e.g. ``"iou>0.5"`` for boxes).
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from cl_bench.errors import CLBenchError
from cl_bench.registry import Registry, unknown_name_error


@dataclass(frozen=True)
class TaskScore:
    """A task's score, per-question scores (0..1, by id), extra metrics and the matching rule.

    ``score`` is a percentage; a caption score can pass 100, as CIDEr (times 100) ranges to 1000.
    """

    score: float
    per_sample: dict[str, float] = field(default_factory=dict)
    details: dict[str, float] = field(default_factory=dict)
    rule: str = "exact"


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
CONTRACTIONS = {c.replace("'", ""): c for c in _CONTRACTION_TEXT.split()}
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
    """min(#references equal to the prediction / 3, 1) with several references, else 0 or 1."""
    answer = normalize_vqa_answer(pred)
    if not answer:
        return 0.0
    matches = sum(normalize_vqa_answer(r) == answer for r in refs)
    return min(matches / 3, 1.0) if len(refs) > 1 else float(matches > 0)


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
    """A single word or phrase, correct when it matches one reference under ``rule``."""
    match = WORD_RULES[rule]
    per_sample = _per_question(
        predictions, references, lambda pred, refs: any(match(pred, r) for r in refs)
    )
    return _from_samples(per_sample, rule)


@SCORERS.register("vqa")
def score_vqa(predictions: dict[str, str], references: References, rule: str) -> TaskScore:
    """VQA accuracy over human answers (``rule`` does not apply)."""
    return _from_samples(_per_question(predictions, references, vqa_accuracy), "vqa_accuracy")


@SCORERS.register("bbox")
def score_boxes(predictions: dict[str, str], references: References, rule: str) -> TaskScore:
    """Referring-expression grounding by IoU (``rule`` does not apply)."""
    return _from_samples(_per_question(predictions, references, box_correct), "iou>0.5")


@SCORERS.register("yesno")
def score_yesno(predictions: dict[str, str], references: References, rule: str) -> TaskScore:
    """Yes/no accuracy on the prediction's first word (``rule`` does not apply)."""
    return _from_samples(_per_question(predictions, references, yesno_correct), "first_word")


CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


@functools.cache
def meteor_scorer():
    """One METEOR Java process per Python process: starting it (loading its paraphrase tables)
    costs seconds, each later call milliseconds."""
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def caption_metrics(predictions: dict[str, str], references: References) -> dict[str, float]:
    """The seven COCO caption metrics (0..1, CIDEr up to 10) on PTB-tokenised captions."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ids = sorted(references)
    captions = {("gt", q): [{"caption": c} for c in references[q]] for q in ids}
    captions |= {("pred", q): [{"caption": predictions[q]}] for q in ids}
    tokens = PTBTokenizer().tokenize(captions)  # one Java start for both sides
    gts = {q: tokens[("gt", q)] for q in ids}
    res = {q: tokens.get(("pred", q), [""]) for q in ids}
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its length ratio
        bleu, _ = Bleu(4).compute_score(gts, res)
    values = [*bleu]
    for metric in (meteor_scorer(), Rouge(), Cider()):
        value, _ = metric.compute_score(gts, res)
        values.append(float(value))
    return dict(zip(CAPTION_METRICS, values, strict=True))


@SCORERS.register("caption")
def score_captions(predictions: dict[str, str], references: References, rule: str) -> TaskScore:
    """Mean of Bleu-1..4, METEOR, ROUGE-L and CIDEr, times 100 (HiDe appendix G); no SPICE."""
    details = {k: 100.0 * v for k, v in caption_metrics(predictions, references).items()}
    return TaskScore(sum(details.values()) / len(details), {}, details, "coco_caption")


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
