"""Readers for LLaVA conversation JSON and the reference repositories' test-file format.

Test records may carry several references: ``references`` or ``answers`` (strings, or VQA-style
``{"answer": ...}`` objects, duplicates kept for VQA accuracy), or a grounding box
``answer_bbox``. A task's separate annotation file (``read_reference_table``: COCO captions,
VQA or TextVQA answers) adds references by question id or image file name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from cl_bench.errors import CLBenchError

if TYPE_CHECKING:
    from tasks.suite import TaskFiles

IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class Sample:
    """One example: its conversation turns (human, gpt), an optional image and references."""

    id: str
    turns: tuple[tuple[str, str], ...]
    image: Path | None = None
    references: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def question(self) -> str:
        return self.turns[0][0]

    @property
    def answer(self) -> str:
        return self.turns[0][1]


def read_json(path: Path) -> object:
    """A JSON file's content; syntax errors name the file and line."""
    if not path.is_file():
        raise CLBenchError(f"data file not found: {path}")
    return _decode(path.read_text(encoding="utf-8"), path, 0)


def read_records(path: Path) -> list[dict]:
    """Records of a JSON list or JSON-lines file; syntax errors name the file and line."""
    if not path.is_file():
        raise CLBenchError(f"data file not found: {path}")
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                records.append(_decode(line, path, lineno))
        return records
    data = read_json(path)
    if not isinstance(data, list):
        raise CLBenchError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _decode(text: str, path: Path, lineno: int):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        line = lineno or err.lineno
        raise CLBenchError(f"{path}:{line}: invalid JSON: {err.msg}") from None


def load_samples(path: Path, image_root: Path, check_images: bool = True) -> list[Sample]:
    """Samples of a data file in either format; a bad record or missing image is named."""
    return [
        parse_record(rec, f"{path}: record {i}", image_root, check_images)
        for i, rec in enumerate(read_records(path))
    ]


def parse_record(rec: dict, where: str, image_root: Path, check_images: bool = True) -> Sample:
    """A sample from a conversation record or a ``{question_id, text, answer}`` record."""
    if not isinstance(rec, dict):
        raise CLBenchError(f"{where}: expected an object, got {type(rec).__name__}")
    rid = rec.get("id", rec.get("question_id"))
    if rid is None:
        raise CLBenchError(f"{where}: missing key 'id' (or 'question_id')")
    where = f"{where} (id {rid})"
    if "conversations" in rec:
        turns = _turns(rec["conversations"], where)
    elif "text" in rec:
        question = str(rec["text"]).replace(IMAGE_TOKEN, "").strip()
        turns = ((question, str(rec.get("answer", "")).strip()),)
    else:
        raise CLBenchError(f"{where}: expected key 'conversations' or 'text'")
    image = _image_path(rec.get("image"), image_root, where, check_images)
    extra = {k: v for k, v in rec.items() if k not in _CORE_KEYS}
    return Sample(str(rid), turns, image, _references(rec, turns[0][1]), extra)


_CORE_KEYS = {
    "id", "question_id", "conversations", "text", "answer", "answers", "image", "references",
}


def _references(rec: dict, answer: str) -> tuple[str, ...]:
    """Several answers if the record lists them, else its box, else its one answer."""
    for key in ("references", "answers"):
        if rec.get(key):
            given = rec[key] if isinstance(rec[key], list) else [rec[key]]
            return tuple(answer_text(a) for a in given)
    if rec.get("answer_bbox") is not None:
        return (box_text(rec["answer_bbox"]),)
    return (answer,) if answer else ()


def answer_text(answer: object) -> str:
    """An answer given as a string or a VQA-style ``{"answer": ...}`` object."""
    return str(answer.get("answer", "")) if isinstance(answer, dict) else str(answer)


def box_text(box: object) -> str:
    """A box as the text "[x1, y1, x2, y2]" (lists are formatted; strings kept as given)."""
    if isinstance(box, list | tuple):
        return "[" + ", ".join(str(v) for v in box) + "]"
    return str(box)


def _turns(conversations: object, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(conversations, list) or len(conversations) < 2:
        raise CLBenchError(f"{where}: 'conversations' must list at least a human and a gpt turn")
    turns = []
    for i in range(0, len(conversations) - 1, 2):
        human, gpt = conversations[i], conversations[i + 1]
        if not (isinstance(human, dict) and isinstance(gpt, dict)) or (
            human.get("from"), gpt.get("from")
        ) != ("human", "gpt"):
            raise CLBenchError(f"{where}: turn {i} must be a 'human' then a 'gpt' message")
        question = str(human.get("value", "")).replace(IMAGE_TOKEN, "").strip()
        turns.append((question, str(gpt.get("value", "")).strip()))
    return tuple(turns)


def _image_path(image: object, root: Path, where: str, check: bool) -> Path | None:
    if not image:
        return None
    path = root / str(image)
    if check and not path.is_file():
        raise CLBenchError(f"{where}: image not found: {path}")
    return path


# ---------------------------------------------------------------- references from annotation files


@dataclass(frozen=True)
class ReferenceTable:
    """References from a task's annotation file, by question id and by image file name."""

    path: Path
    by_id: dict[str, tuple[str, ...]]
    by_image: dict[str, tuple[str, ...]]

    def lookup(self, sample: Sample) -> tuple[str, ...] | None:
        refs = self.by_id.get(sample.id)
        if refs is None and sample.image is not None:
            refs = self.by_image.get(sample.image.name)
        return refs


def read_reference_table(path: Path) -> ReferenceTable:
    """Read COCO captions (``images`` + ``annotations`` with ``caption``: by image file name),
    VQA annotations (``annotations`` with ``answers``), TextVQA (``data``) or a list of
    ``{question_id, answers}`` records (by question id), ``{question_id, answer_bbox}`` records
    (grounding) or ``{image, answers}`` records (VizWiz, by image file name)."""
    data = read_json(path)
    by_id: dict[str, list[str]] = {}
    by_image: dict[str, list[str]] = {}
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        names = {img["id"]: Path(str(img["file_name"])).name for img in _objects(data, "images")}
        for ann in _objects(data, "annotations"):
            if ann.get("image_id") in names and "caption" in ann:
                by_image.setdefault(names[ann["image_id"]], []).append(str(ann["caption"]))
    else:
        rows = data.get("annotations", data.get("data")) if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise CLBenchError(
                f"{path}: unrecognised reference file (expected COCO captions, VQA "
                "'annotations', TextVQA 'data' or a list of {question_id, answers} records)"
            )
        for row in rows:
            if isinstance(row, dict) and "question_id" in row and row.get("answer_bbox"):
                by_id[str(row["question_id"])] = [box_text(row["answer_bbox"])]
            if not (isinstance(row, dict) and row.get("answers")):
                continue
            answers = [answer_text(a) for a in row["answers"]]
            if "question_id" in row:
                by_id[str(row["question_id"])] = answers
            elif row.get("image"):
                by_image[Path(str(row["image"])).name] = answers
    if not by_id and not by_image:
        raise CLBenchError(f"{path}: no references found in this annotation file")
    return ReferenceTable(
        path, {k: tuple(v) for k, v in by_id.items()}, {k: tuple(v) for k, v in by_image.items()}
    )


def _objects(data: dict, key: str) -> list[dict]:
    items = data.get(key)
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise CLBenchError(f"COCO annotation file: '{key}' must be a list of objects")
    return items


def with_references(samples: list[Sample], table: ReferenceTable) -> tuple[list[Sample], int]:
    """Samples with the table's references where it has them, and how many it lacked."""
    out, unmatched = [], 0
    for sample in samples:
        refs = table.lookup(sample)
        unmatched += refs is None
        out.append(sample if refs is None else replace(sample, references=refs))
    return out, unmatched


def load_test_samples(files: TaskFiles, check_images: bool = True) -> list[Sample]:
    """A task's test samples, with the references of its annotation file when it has one."""
    samples = load_samples(files.test, files.image_root, check_images)
    if files.references is not None:
        samples, _ = with_references(samples, read_reference_table(files.references))
    return samples
