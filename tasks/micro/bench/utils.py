"""lmms-eval functions of the micro benchmarks; every number comes from ``tasks.scoring``.

``process_results`` passes each answer on as a payload (id, prediction, references, split, pair,
rule); the aggregations score the whole list with the harness's own ``score_task``, so the
lmms-eval scores equal the harness's on the same predictions.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from PIL import Image

from tasks.scoring import score_task

Payload = dict


def doc_to_visual(doc: dict) -> list[Image.Image]:
    if not doc.get("image"):
        return []
    with Image.open(doc["image"]) as img:
        return [img.convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["text"]


def payload(doc: dict, results: list[str]) -> Payload:
    return {
        "id": doc["question_id"],
        "prediction": results[0] if results else "",
        "references": list(doc["references"]),
        "category": doc["category"],
        "pair_id": doc["pair_id"],
        "rule": doc["rule"],
    }


def mme_process_results(doc: dict, results: list[str]) -> dict[str, Payload]:
    item = payload(doc, results)
    return {"acc": item, "acc_plus": item}


def pope_process_results(doc: dict, results: list[str]) -> dict[str, Payload]:
    item = payload(doc, results)
    metrics = ["acc", "f1", "precision", "recall", "yes_ratio"]
    metrics += [f"{m}_{split}" for m in ("acc", "f1") for split in POPE_SPLITS]
    return {m: item for m in metrics}


def open_process_results(doc: dict, results: list[str]) -> dict[str, Payload]:
    item = payload(doc, results)
    return {"score": item, "words": item}


def _score(answer_type: str, items: list[Payload], references: dict | None = None):
    predictions = {it["id"]: it["prediction"] for it in items}
    refs = references or {it["id"]: it["references"] for it in items}
    rule = items[0]["rule"] if items else "exact"
    return score_task(answer_type, predictions, refs, rule)


def yes_no_accuracy(items: list[Payload]) -> float:
    """Accuracy (percent) of yes/no answers, as the harness scores them."""
    return _score("yesno", items).score if items else math.nan


def accuracy_plus(items: list[Payload]) -> float:
    """MME's accuracy+ (percent): pairs (one image, two questions) with every answer right."""
    if not items:
        return math.nan
    correct = _score("yesno", items).per_sample
    pairs: dict[str, bool] = {}
    for it in items:
        pairs[it["pair_id"]] = pairs.get(it["pair_id"], True) and bool(correct.get(it["id"]))
    return 100.0 * sum(pairs.values()) / len(pairs)


def said_yes(items: list[Payload]) -> dict[str, bool]:
    """Which answers the harness reads as "yes" (scored against a "yes" reference)."""
    yes = _score("yesno", items, {it["id"]: ["yes"] for it in items}).per_sample
    return {it["id"]: bool(yes.get(it["id"])) for it in items}


def confusion(items: list[Payload]) -> tuple[int, int, int]:
    """True positives, false positives, false negatives ("yes" is positive)."""
    yes = said_yes(items)
    truth = {it["id"]: _normal(it["references"][0]) == "yes" for it in items}
    tp = sum(yes[i] and truth[i] for i in yes)
    fp = sum(yes[i] and not truth[i] for i in yes)
    fn = sum(not yes[i] and truth[i] for i in yes)
    return tp, fp, fn


def precision(items: list[Payload]) -> float:
    tp, fp, _ = confusion(items)
    return 100.0 * tp / (tp + fp) if tp + fp else 0.0


def recall(items: list[Payload]) -> float:
    tp, _, fn = confusion(items)
    return 100.0 * tp / (tp + fn) if tp + fn else 0.0


def f1(items: list[Payload]) -> float:
    if not items:
        return math.nan
    tp, fp, fn = confusion(items)
    return 100.0 * 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def yes_ratio(items: list[Payload]) -> float:
    yes = said_yes(items)
    return 100.0 * sum(yes.values()) / len(yes) if yes else math.nan


def _on_split(metric: Callable[[list[Payload]], float], split: str) -> Callable:
    def aggregate(items: list[Payload]) -> float:
        return metric([it for it in items if it["category"] == split])

    aggregate.__name__ = f"{metric.__name__}_{split}"
    return aggregate


POPE_SPLITS = ("random", "popular", "adversarial")
acc_random = _on_split(yes_no_accuracy, "random")
acc_popular = _on_split(yes_no_accuracy, "popular")
acc_adversarial = _on_split(yes_no_accuracy, "adversarial")
f1_random = _on_split(f1, "random")
f1_popular = _on_split(f1, "popular")
f1_adversarial = _on_split(f1, "adversarial")


def open_score(items: list[Payload]) -> float:
    """Free-form answers scored like captions (mean of Bleu-1..4, METEOR, ROUGE-L, CIDEr)."""
    return _score("caption", items).score if items else math.nan


def mean_words(items: list[Payload]) -> float:
    return sum(len(it["prediction"].split()) for it in items) / len(items) if items else math.nan


def _normal(text: str) -> str:
    return text.strip().strip(".").lower()
