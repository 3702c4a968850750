"""Readers for LLaVA conversation JSON and the reference repositories' test-file format."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cl_bench.errors import CLBenchError

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


def read_records(path: Path) -> list[dict]:
    """Records of a JSON list or JSON-lines file; syntax errors name the file and line."""
    if not path.is_file():
        raise CLBenchError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                records.append(_decode(line, path, lineno))
        return records
    data = _decode(text, path, 0)
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
        turns = ((str(rec["text"]), str(rec.get("answer", ""))),)
    else:
        raise CLBenchError(f"{where}: expected key 'conversations' or 'text'")
    image = _image_path(rec.get("image"), image_root, where, check_images)
    refs = rec.get("references") or ([turns[0][1]] if turns[0][1] else [])
    extra = {k: v for k, v in rec.items() if k not in _CORE_KEYS}
    return Sample(str(rid), turns, image, tuple(str(r) for r in refs), extra)


_CORE_KEYS = {"id", "question_id", "conversations", "text", "answer", "image", "references"}


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
