"""One generated example and its two on-disk formats (LLaVA conversations, reference test)."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

IMAGE_TOKEN = "<image>"


@dataclass
class Example:
    """A question (with its instruction), its answer, an optional image and extra fields."""

    question: str
    answer: str = ""
    image: Image.Image | None = None
    references: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)
    caption: str = ""  # a complete description of the image (general mix: for CLIP training)


def train_record(rid: str, image: str | None, ex: Example) -> dict:
    """``{"id", "image"?, "conversations": [human, gpt], "caption"?, ...extra}`` (LLaVA
    conversation JSON; extra keys such as the general mix's ``category`` are ignored by loaders)."""
    human = f"{IMAGE_TOKEN}\n{ex.question}" if image else ex.question
    record: dict = {"id": rid}
    if image:
        record["image"] = image
    record["conversations"] = [
        {"from": "human", "value": human},
        {"from": "gpt", "value": ex.answer},
    ]
    if ex.caption:
        record["caption"] = ex.caption
    record.update(ex.extra)
    return record


def test_record(qid: str, image: str | None, ex: Example) -> dict:
    """``{"question_id", "image"?, "text", "answer", "references"?, ...extra}``."""
    record: dict = {"question_id": qid}
    if image:
        record["image"] = image
    record["text"] = ex.question
    record["answer"] = ex.answer
    if ex.references:
        record["references"] = list(ex.references)
    record.update(ex.extra)
    return record


def inquiry_record(rid: str, image: str | None, ex: Example) -> dict:
    """``{"id", "text", "image"?}``: an unlabeled inquiry or probe."""
    record: dict = {"id": rid, "text": ex.question}
    if image:
        record["image"] = image
    record.update(ex.extra)
    return record


def caption_record(rid: str, image: str | None, ex: Example) -> dict:
    """``{"id", "image", "caption", "family"}``: an image-caption pair (CLIP pretraining)."""
    return {"id": rid, "image": image, "caption": ex.caption, **ex.extra}
