"""LLaVA-1.5's instruction mix split by image source: the six tasks of LLaVA-c's continual
pretraining (tqa, coco, ocr, textvqa, gqa, vg).

``write_splits(data_root)`` reads ``<data_root>/llava_v1_5_mix665k.json`` and writes, under
``<data_root>/llava665k/``: ``<split>/train.json`` (every record of that source, unchanged),
``<split>/test.json`` (a seeded retention probe: up to ``probe_size`` of those training records
whose first question has the split's short-answer form, in the test-record format) and
``inquiries.json`` (the first question of every tqa record: LLaVA-c's unlabeled inquiry set).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from cl_bench.errors import CLBenchError
from tasks.loaders import IMAGE_TOKEN, read_records

SOURCE_FILE = "llava_v1_5_mix665k.json"
SPLITS_DIR = "llava665k"
INQUIRY_FILE = f"{SPLITS_DIR}/inquiries.json"
# LLaVA-c, Table 7: records per source; they add up to the file's 665,298.
EXPECTED_COUNTS = {
    "tqa": 40688, "coco": 364100, "ocr": 80000, "textvqa": 21953, "gqa": 72140, "vg": 86417,
}
IMAGE_PREFIXES = {"coco/": "coco", "ocr_vqa/": "ocr", "textvqa/": "textvqa", "gqa/": "gqa",
                  "vg/": "vg"}
WORD = "Answer the question using a single word or phrase."


@dataclass(frozen=True)
class ProbeRule:
    """Which training records of a split make its probe: the first question contains
    ``marker`` (any record when empty); answers are scored as ``answer_type``."""

    answer_type: str
    marker: str


PROBE_RULES = {
    "tqa": ProbeRule("caption", ""),
    "coco": ProbeRule("word", WORD),
    "ocr": ProbeRule("word", WORD),
    "textvqa": ProbeRule("caption", "caption"),
    "gqa": ProbeRule("word", WORD),
    "vg": ProbeRule("bbox", "bounding box coordinate"),
}


def split_of(record: dict, where: str) -> str:
    """The split of a record by its image path: no image -> tqa, ``coco/`` -> coco, ..."""
    image = record.get("image") if isinstance(record, dict) else None
    if not image:
        return "tqa"
    for prefix, split in IMAGE_PREFIXES.items():
        if str(image).startswith(prefix):
            return split
    raise CLBenchError(
        f"{where}: image {image!r} has none of the sources {', '.join(IMAGE_PREFIXES)}"
    )


def split_records(records: list[dict], source: str = SOURCE_FILE) -> dict[str, list[dict]]:
    """Records grouped by split, in the file's order."""
    splits: dict[str, list[dict]] = {name: [] for name in EXPECTED_COUNTS}
    for i, record in enumerate(records):
        splits[split_of(record, f"{source}: record {i}")].append(record)
    return splits


def first_turn(record: dict) -> tuple[str, str] | None:
    """The first human question (without the image token) and gpt answer, if well formed
    (text values; a null or a list never becomes a "None" question)."""
    conv = record.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2 or not all(isinstance(c, dict) for c in conv):
        return None
    if (conv[0].get("from"), conv[1].get("from")) != ("human", "gpt"):
        return None
    question, answer = conv[0].get("value"), conv[1].get("value")
    if not (isinstance(question, str) and isinstance(answer, str)):
        return None
    question, answer = question.replace(IMAGE_TOKEN, "").strip(), answer.strip()
    return (question, answer) if question and answer else None


def probe_records(
    split: str, records: list[dict], size: int, seed: int = 0
) -> list[dict]:
    """Up to ``size`` test records ``{question_id, image, text, answer}`` drawn (seeded) from
    the split's records that match its probe rule."""
    from tasks.scoring import parse_box

    rule = PROBE_RULES[split]
    chosen = []
    for i, record in enumerate(records):
        turn = first_turn(record)
        if turn is None or rule.marker not in turn[0]:
            continue
        if rule.answer_type == "bbox" and parse_box(turn[1]) is None:
            continue
        chosen.append((i, record, turn))
    rng = random.Random(f"{seed}-{split}")
    picked = sorted(rng.sample(chosen, min(size, len(chosen))), key=lambda c: c[0])
    probes = []
    for i, record, (question, answer) in picked:
        row = {"question_id": f"{split}-{i}", "source_id": record.get("id"),
               "text": question, "answer": answer}
        if record.get("image"):
            row["image"] = record["image"]
        probes.append(row)
    return probes


def inquiry_records(tqa: list[dict]) -> list[dict]:
    """LLaVA-c's unlabeled inquiries: the first question of each text-only record."""
    rows = []
    for i, record in enumerate(tqa):
        turn = first_turn(record)
        if turn is not None:
            rows.append({"id": f"tqa-{i}", "text": turn[0]})
    return rows


def write_json_lines(path: Path, records: list[dict]) -> None:
    """A JSON list with one record per line (so a line number names a record)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = ",\n".join(json.dumps(r, ensure_ascii=False) for r in records)
    path.write_text(f"[\n{body}\n]\n" if records else "[]\n", encoding="utf-8")


@dataclass(frozen=True)
class SplitResult:
    """What ``write_splits`` wrote: records per split, probe sizes and the inquiry count."""

    out_dir: Path
    counts: dict[str, int]
    probes: dict[str, int]
    inquiries: int

    def table(self) -> str:
        lines = [f"{'split':<8} {'train':>9} {'expected':>9} {'probe':>6}"]
        for name, n in self.counts.items():
            flag = "" if n == EXPECTED_COUNTS[name] else "  (differs)"
            lines.append(
                f"{name:<8} {n:>9,} {EXPECTED_COUNTS[name]:>9,} {self.probes[name]:>6}{flag}"
            )
        total = sum(self.counts.values())
        lines.append(f"{'total':<8} {total:>9,} {sum(EXPECTED_COUNTS.values()):>9,}")
        lines.append(f"{self.inquiries:,} inquiries in {self.out_dir / 'inquiries.json'}")
        return "\n".join(lines)


def write_splits(
    data_root: Path, source: Path | None = None, probe_size: int = 500, seed: int = 0
) -> SplitResult:
    """Split ``source`` (default ``<data_root>/llava_v1_5_mix665k.json``) into
    ``<data_root>/llava665k/<split>/{train,test}.json`` and ``inquiries.json``."""
    source = source or data_root / SOURCE_FILE
    if not source.is_file():
        raise CLBenchError(
            f"{source} not found: the llava665k suite is made from LLaVA-1.5's instruction mix "
            f"{SOURCE_FILE} (give --source PATH if it lies elsewhere)"
        )
    splits = split_records(read_records(source), source.name)
    out = data_root / SPLITS_DIR
    probes = {}
    for name, records in splits.items():
        write_json_lines(out / name / "train.json", records)
        probe = probe_records(name, records, probe_size, seed)
        write_json_lines(out / name / "test.json", probe)
        probes[name] = len(probe)
    inquiries = inquiry_records(splits["tqa"])
    write_json_lines(out / "inquiries.json", inquiries)
    counts = {name: len(records) for name, records in splits.items()}
    return SplitResult(out, counts, probes, len(inquiries))
