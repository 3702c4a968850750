"""The micro world's general benchmarks as local lmms-eval tasks (offline YAML + JSON lines).

The bench files live under ``<data_root>/general/bench`` (generated with the micro world). Before
each evaluation they are converted to uniform lmms-eval documents (absolute image paths, a list
of references, the answer-matching rule) and the task YAMLs beside this module are filled in
with those files' paths, in a folder handed to lmms-eval's ``TaskManager(include_path=...)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from string import Template

from cl_bench.errors import CLBenchError
from tasks.loaders import read_records

BENCH_DIR = "general/bench"
HERE = Path(__file__).parent


@dataclass(frozen=True)
class LocalBenchmark:
    """A local lmms-eval task: its name, its bench files and how documents are ordered."""

    name: str
    files: tuple[str, ...]
    pair_order: bool = False  # keep each pair's questions adjacent (MME's accuracy+)
    split_by_file: bool = False  # the category is the file's split (pope_<split>.json)

    @property
    def template(self) -> Path:
        return HERE / f"{self.name}.yaml"


LOCAL_BENCHMARKS: dict[str, LocalBenchmark] = {
    b.name: b
    for b in (
        LocalBenchmark("micro_mme", ("mme.json",), pair_order=True),
        LocalBenchmark(
            "micro_pope",
            ("pope_random.json", "pope_popular.json", "pope_adversarial.json"),
            split_by_file=True,
        ),
        LocalBenchmark("micro_open", ("open.json",)),
    )
}


def write_local_task(
    bench: LocalBenchmark, data_root: Path, folder: Path, rule: str, cache_dir: Path
) -> Path:
    """Write ``<name>.jsonl`` (documents) and ``<name>.yaml`` (the task) into ``folder``."""
    groups = []
    for file in bench.files:
        split = _split(file) if bench.split_by_file else None
        records = read_records(data_root / BENCH_DIR / file)
        groups.append([to_document(r, data_root, split) for r in records])
    docs = interleave(groups)
    if bench.pair_order:
        docs = pair_ordered(docs)
    for doc in docs:
        doc["rule"] = rule
    data = folder / f"{bench.name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    text = Template(bench.template.read_text()).substitute(
        docs=json.dumps(str(data)), cache_dir=json.dumps(str(cache_dir))
    )
    path = folder / f"{bench.name}.yaml"
    path.write_text(text)
    return path


def to_document(record: dict, data_root: Path, category: str | None = None) -> dict:
    """A bench record as a uniform document (every field present, for one Arrow schema);
    ``category`` overrides the record's own."""
    try:
        qid, text = str(record["question_id"]), str(record["text"])
        references = record.get("references") or [record["answer"]]
    except KeyError as err:
        raise CLBenchError(f"micro bench record without {err.args[0]!r}: {record}") from None
    image = record.get("image")
    return {
        "question_id": qid,
        "text": text,
        "image": str(resolve_image(image, data_root)) if image else "",
        "answer": str(references[0]),
        "references": [str(r) for r in references],
        "category": str(category or record.get("category") or ""),
        "pair_id": str(record.get("pair_id", qid)),
    }


def resolve_image(relative: str, data_root: Path) -> Path:
    """An image path of a bench record: relative to ``<data_root>/general`` (or the bench
    folder, or the data root)."""
    for base in (data_root / "general", data_root / BENCH_DIR, data_root):
        if (base / relative).is_file():
            return base / relative
    raise CLBenchError(f"micro bench image {relative} not found under {data_root / 'general'}")


def interleave(groups: list[list[dict]]) -> list[dict]:
    """Round-robin over the files, so that a ``limit`` keeps every split."""
    out = []
    for i in range(max((len(g) for g in groups), default=0)):
        out += [g[i] for g in groups if i < len(g)]
    return out


def pair_ordered(docs: list[dict]) -> list[dict]:
    """Documents grouped by ``pair_id`` (in order of first appearance)."""
    first: dict[str, int] = {}
    for i, doc in enumerate(docs):
        first.setdefault(doc["pair_id"], i)
    return sorted(docs, key=lambda d: first[d["pair_id"]])


def _split(file: str) -> str:
    stem = Path(file).stem
    return stem.split("_", 1)[1] if "_" in stem else stem
