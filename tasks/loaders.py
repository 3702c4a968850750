"""Readers for LLaVA conversation JSON and the reference repositories' test-file format.

Test records may carry several references: ``references`` or ``answers`` (strings, or VQA-style
``{"answer": ...}`` objects, duplicates kept for VQA accuracy), or a grounding box
``answer_bbox``. A task's separate annotation file (``read_reference_table``: COCO captions,
VQA or TextVQA answers) adds references by question id or image file name.
"""

from __future__ import annotations

import codecs
import json
import math
import posixpath
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath, PureWindowsPath
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


def read_text(path: Path) -> str:
    """A data file's text. Data files are UTF-8; a UTF-8, UTF-16 or UTF-32 byte-order mark (as
    Windows editors and PowerShell write) is honoured. Any other encoding, a NUL byte (UTF-16
    without a mark, a binary or zero-filled partial download) or a folder is an error naming the
    file, the byte offset and the line."""
    if path.is_dir():
        raise CLBenchError(f"{path} is a folder, expected a data file")
    if not path.is_file():
        raise CLBenchError(f"data file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CLBenchError(f"cannot read {path}: {err.strerror or err}") from None
    for bom, codec in _BOMS:
        if data.startswith(bom):
            return _decode_bytes(data[len(bom) :], codec, path, len(bom))
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise CLBenchError(
            f"{path}: byte offset {nul} (line {line}): a NUL byte, so "
            "this is not UTF-8 text: UTF-16/32 without a byte-order mark, a binary file, or an "
            "incomplete download? Files must be UTF-8"
        )
    return _decode_bytes(data, "utf-8", path, 0)


_BOMS = (  # UTF-32 first: its little-endian mark starts with UTF-16's
    (codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


def _decode_bytes(data: bytes, codec: str, path: Path, skipped: int) -> str:
    try:
        return data.decode(codec)
    except UnicodeDecodeError as err:
        offset = skipped + err.start
        bad = data[err.start : err.end].hex(" ")
        line = data.count(b"\n", 0, err.start) + 1
        expected = "UTF-8" if codec == "utf-8" else f"{codec.upper()} (its byte-order mark)"
        raise CLBenchError(
            f"{path}: byte offset {offset} (line {line}): bytes {bad} are not valid {expected}. "
            "Files must be UTF-8 (a UTF-8 or UTF-16 byte-order mark is also accepted): "
            "re-save it as UTF-8, e.g. `iconv -f <its encoding> -t utf-8`"
        ) from None


def read_json(path: Path) -> object:
    """A JSON file's content; encoding and syntax errors name the file and line."""
    text = read_text(path)
    if not text.strip():
        raise CLBenchError(f"{path}: the file is empty (an incomplete download?); expected JSON")
    return _decode(text, path, 0)


def read_records(path: Path) -> list[dict]:
    """Records of a JSON list or a JSON-lines file (``.jsonl``, or a ``.json`` file holding one
    object per line); encoding and syntax errors name the file and line."""
    text = read_text(path)
    if not text.strip():
        raise CLBenchError(f"{path}: the file is empty (an incomplete download?); expected a "
                           "JSON list of records")
    if path.suffix == ".jsonl":
        return _json_lines(text, path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and text.lstrip().startswith("{"):
            return _json_lines(text, path)
        raise CLBenchError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        hint = f" (its key {lists[0]!r} holds a list: are the records there?)" if lists else ""
        raise CLBenchError(
            f"{path}: expected a JSON list of records, got an object with keys "
            f"{', '.join(map(repr, list(data)[:5]))}{hint}"
        )
    if not isinstance(data, list):
        raise CLBenchError(f"{path}: expected a JSON list of records, got {json_type(data)}")
    return data


def _json_lines(text: str, path: Path) -> list:
    return [_decode(line, path, n) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _decode(text: str, path: Path, lineno: int):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        line = lineno or err.lineno
        raise CLBenchError(f"{path}:{line}: invalid JSON: {err.msg}") from None


# ---------------------------------------------------------------- typed fields


def json_type(value: object) -> str:
    """How a JSON value reads in an error message: null, true, a number, a list, an object."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return f"the number {value}"
    return {list: "a list", dict: "an object", str: "text"}.get(type(value), type(value).__name__)


def text_value(value: object, key: str) -> str:
    """A text field: a string as it is, an integer or finite decimal number as written (3 ->
    "3"); null, true/false, NaN, lists and objects are errors naming ``key``."""
    if isinstance(value, str):
        return value
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if number and math.isfinite(value):
        return str(value)
    raise CLBenchError(f"key {key!r}: expected text, got {json_type(value)}")


def reference_text(value: object, key: str) -> str:
    """One reference answer: text, a number or a VQA-style ``{"answer": ...}`` object; empty
    references are errors naming ``key``."""
    if isinstance(value, dict):
        if "answer" not in value:
            raise CLBenchError(f"key {key!r}: an object without an 'answer'")
        value, key = value["answer"], f"{key}.answer"
    text = text_value(value, key).strip()
    if not text:
        raise CLBenchError(f"key {key!r}: an empty reference answer")
    return text


def reference_list(value: object, key: str) -> tuple[str, ...]:
    """References given as a list (or one value), each checked by ``reference_text``."""
    items = value if isinstance(value, list) else [value]
    return tuple(reference_text(item, f"{key}[{i}]") for i, item in enumerate(items))


def box_text(box: object, key: str = "answer_bbox") -> str:
    """A box as the text "[x1, y1, x2, y2]": four numbers are formatted, text is kept as given
    (the scorer parses it); anything else is an error naming ``key``."""
    if isinstance(box, str):
        return box
    if isinstance(box, list) and len(box) == 4 and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in box
    ):
        return "[" + ", ".join(str(v) for v in box) + "]"
    raise CLBenchError(f"key {key!r}: expected [x1, y1, x2, y2], got {json_type(box)}")


def id_text(value: object, key: str) -> str:
    """An id: a non-empty string or an integer, as text; anything else names ``key``."""
    if isinstance(value, bool) or not isinstance(value, int | str) or value == "":
        raise CLBenchError(f"key {key!r}: expected a non-empty string or an integer, "
                           f"got {json_type(value)}")
    return str(value)


def record_id(rec: dict) -> str:
    """A record's ``id`` (or ``question_id``)."""
    key = "id" if rec.get("id") is not None else "question_id"
    if rec.get(key) is None:
        raise CLBenchError("missing key 'id' (or 'question_id')")
    return id_text(rec[key], key)


# ---------------------------------------------------------------- records


def load_samples(path: Path, image_root: Path, check_images: bool = True) -> list[Sample]:
    """Samples of a data file in either format; a bad record or missing image is named."""
    return [
        parse_record(rec, f"{path}: record {i}", image_root, check_images)
        for i, rec in enumerate(read_records(path))
    ]


def parse_record(rec: dict, where: str, image_root: Path, check_images: bool = True) -> Sample:
    """A sample from a conversation record or a ``{question_id, text, answer}`` record.

    Every field is checked for a usable type (see ``text_value``, ``reference_text``,
    ``image_path``); an error names ``where``, the record's id and the key.
    """
    if not isinstance(rec, dict):
        raise CLBenchError(f"{where}: expected an object, got {json_type(rec)}")
    try:
        rid = record_id(rec)
    except CLBenchError as err:
        raise CLBenchError(f"{where}: {err}") from None
    where = f"{where} (id {rid})"
    try:
        if "conversations" in rec:
            turns = _turns(rec["conversations"])
        elif "text" in rec:
            question = text_value(rec["text"], "text").replace(IMAGE_TOKEN, "").strip()
            answer = text_value(rec.get("answer", ""), "answer").strip()
            turns = ((question, answer),)
        else:
            raise CLBenchError("expected key 'conversations' or 'text'")
        image = image_path(rec.get("image"), image_root)
        references = _references(rec, turns[0][1])
    except CLBenchError as err:
        raise CLBenchError(f"{where}: {err}") from None
    if check_images and image is not None and not image.is_file():
        raise CLBenchError(f"{where}: image not found: {image}")
    extra = {k: v for k, v in rec.items() if k not in _CORE_KEYS}
    return Sample(rid, turns, image, references, extra)


_CORE_KEYS = {
    "id", "question_id", "conversations", "text", "answer", "answers", "image", "references",
}


def _references(rec: dict, answer: str) -> tuple[str, ...]:
    """Several answers if the record lists them, else its box, else its one answer."""
    for key in ("references", "answers"):
        if rec.get(key) not in (None, [], ""):
            return reference_list(rec[key], key)
    if rec.get("answer_bbox") is not None:
        return (box_text(rec["answer_bbox"]),)
    return (answer,) if answer else ()


def _turns(conversations: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(conversations, list) or len(conversations) < 2:
        raise CLBenchError("'conversations' must list at least a human and a gpt turn")
    turns = []
    for i in range(0, len(conversations) - 1, 2):
        human, gpt = conversations[i], conversations[i + 1]
        if not (isinstance(human, dict) and isinstance(gpt, dict)) or (
            human.get("from"), gpt.get("from")
        ) != ("human", "gpt"):
            raise CLBenchError(f"turn {i} must be a 'human' then a 'gpt' message")
        question = text_value(human.get("value", ""), f"conversations[{i}].value")
        answer = text_value(gpt.get("value", ""), f"conversations[{i + 1}].value")
        turns.append((question.replace(IMAGE_TOKEN, "").strip(), answer.strip()))
    return tuple(turns)


def image_path(image: object, root: Path) -> Path | None:
    """A record's image under ``root``: None for text-only records (no key, null or ""). The
    path must be relative and stay inside ``root`` (Windows backslashes are read as /)."""
    if image is None or image == "":
        return None
    if not isinstance(image, str):
        message = f"key 'image': expected one relative path, got {json_type(image)}"
        if isinstance(image, list):
            message += " (records with several images are not supported)"
        raise CLBenchError(message)
    relative = image.replace("\\", "/")
    if relative.startswith("/") or PureWindowsPath(relative).drive:
        raise CLBenchError(
            f"key 'image': {image!r} is an absolute path; image paths are relative to the "
            f"image folder {root}"
        )
    if PurePosixPath(posixpath.normpath(relative)).parts[0] == "..":
        raise CLBenchError(f"key 'image': {image!r} leads out of the image folder {root}")
    return root / relative


# ---------------------------------------------------------------- references from annotation files


@dataclass(frozen=True)
class ReferenceTable:
    """References from a task's annotation file, by question id and by image file name, and
    notes on rows it could not use."""

    path: Path
    by_id: dict[str, tuple[str, ...]]
    by_image: dict[str, tuple[str, ...]]
    notes: tuple[str, ...] = ()

    def lookup(self, sample: Sample) -> tuple[str, ...] | None:
        refs = self.by_id.get(sample.id)
        if refs is None and sample.image is not None:
            refs = self.by_image.get(sample.image.name)
        return refs


def read_reference_table(path: Path) -> ReferenceTable:
    """Read COCO captions (``images`` + ``annotations`` with ``caption``: by image file name),
    VQA annotations (``annotations`` with ``answers``), TextVQA (``data``) or a list of
    ``{question_id, answers}`` records (by question id), ``{question_id, answer_bbox}`` records
    (grounding) or ``{image, answers}`` records (VizWiz, by image file name).

    A malformed entry is an error naming the file, the entry (``annotations[12]``) and the key.
    """
    data = read_json(path)
    try:
        if isinstance(data, dict) and "images" in data:
            by_id = {}
            by_image, notes = _coco_captions(data)
        else:
            by_id, by_image, notes = _answer_rows(data)
    except CLBenchError as err:
        raise CLBenchError(f"{path}: {err}") from None
    if not by_id and not by_image:
        raise CLBenchError(f"{path}: no references found in this annotation file")
    return ReferenceTable(
        path, {k: tuple(v) for k, v in by_id.items()},
        {k: tuple(v) for k, v in by_image.items()}, tuple(notes),
    )


def _objects(data: dict, key: str) -> list[dict]:
    """``data[key]``: a list of objects, else an error naming the key or the bad entry."""
    if key not in data:
        raise CLBenchError(
            f"a COCO caption file needs {key!r} (found keys {', '.join(map(repr, data))}): "
            "expected 'images': [{'id', 'file_name'}] and 'annotations': [{'image_id', "
            "'caption'}]"
        )
    items = data[key]
    if not isinstance(items, list):
        raise CLBenchError(f"key {key!r}: expected a list of objects, got {json_type(items)}")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise CLBenchError(f"{key}[{i}]: expected an object, got {json_type(item)}")
    return items


def _required(item: dict, where: str, key: str) -> object:
    if item.get(key) is None:
        raise CLBenchError(f"{where}: " + (f"key {key!r} is null" if key in item
                                           else f"missing key {key!r}"))
    return item[key]


def _coco_captions(data: dict) -> tuple[dict[str, list[str]], list[str]]:
    """Captions by image file name; duplicate file names in other folders are an error."""
    names: dict[object, str] = {}
    folders: dict[str, tuple[int, str]] = {}
    for i, img in enumerate(_objects(data, "images")):
        where = f"images[{i}]"
        file_name = text_value(_required(img, where, "file_name"), f"{where}.file_name")
        name = PurePosixPath(file_name.replace("\\", "/")).name
        first = folders.setdefault(name, (i, file_name))
        if first[1] != file_name:
            raise CLBenchError(
                f"images[{first[0]}] and {where} are both named {name!r} in different folders; "
                "references are matched by file name, so their captions would mix"
            )
        names[_required(img, where, "id")] = name
    by_image: dict[str, list[str]] = {}
    orphans = 0
    for i, ann in enumerate(_objects(data, "annotations")):
        where = f"annotations[{i}]"
        caption = reference_text(_required(ann, where, "caption"), f"{where}.caption")
        name = names.get(_required(ann, where, "image_id"))
        if name is None:
            orphans += 1
            continue
        by_image.setdefault(name, []).append(caption)
    notes = [f"{orphans} caption(s) name an image id missing from 'images' (ignored)"] * bool(
        orphans)
    return by_image, notes


def _answer_rows(data: object) -> tuple[dict[str, list[str]], dict[str, list[str]], list[str]]:
    """References of VQA / TextVQA / VizWiz / grounding rows, by question id or image name."""
    if isinstance(data, dict):
        key = next((k for k in ("annotations", "data") if k in data), None)
        if key is None:
            raise CLBenchError(
                f"unrecognised reference file (found keys {', '.join(map(repr, data))}; "
                "expected COCO captions, VQA 'annotations', TextVQA 'data' or a list of "
                "{question_id, answers} records)"
            )
        rows = data[key]
    else:
        key, rows = "", data
    if not isinstance(rows, list):
        raise CLBenchError(f"key {key!r}: expected a list of rows, got {json_type(rows)}")
    by_id: dict[str, list[str]] = {}
    by_image: dict[str, list[str]] = {}
    empty = 0
    for i, row in enumerate(rows):
        where = f"{key}[{i}]" if key else f"row {i}"
        if not isinstance(row, dict):
            raise CLBenchError(f"{where}: expected an object, got {json_type(row)}")
        if row.get("answer_bbox") is not None:
            rid = id_text(_required(row, where, "question_id"), f"{where}.question_id")
            by_id[rid] = [box_text(row["answer_bbox"], f"{where}.answer_bbox")]
        if row.get("answers") in (None, [], ""):
            empty += "answer_bbox" not in row
            continue
        answers = list(reference_list(row["answers"], f"{where}.answers"))
        if row.get("question_id") is not None:
            by_id[id_text(row["question_id"], f"{where}.question_id")] = answers
        elif isinstance(row.get("image"), str) and row["image"]:
            by_image[PurePosixPath(row["image"].replace("\\", "/")).name] = answers
        else:
            raise CLBenchError(f"{where}: answers without a 'question_id' or an 'image'")
    notes = [f"{empty} row(s) without answers (ignored)"] * bool(empty)
    return by_id, by_image, notes


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
