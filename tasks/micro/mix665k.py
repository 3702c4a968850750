"""``llava665k-micro``: the general instruction mix split by source into six tasks, as LLaVA-c
splits LLaVA-665k (tqa, coco, ocr, textvqa, gqa, vg), learned from the aligned-only model.

Each task trains on the general mix's records of its kinds (the same files and images) and is
tested on held-out questions of those kinds, generated from their own streams.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from tasks.micro.general import generate_general
from tasks.micro.records import Example


@dataclass(frozen=True)
class MixSource:
    """One task of the split: the general-mix kinds it holds, the LLaVA-665k source it mirrors
    and how its answers are scored."""

    name: str
    letter: str
    kinds: tuple[str, ...]
    mirrors: str
    answer_type: str


MIX_SOURCES: tuple[MixSource, ...] = (
    MixSource("text", "Q", ("text",), "tqa (ShareGPT, text only)", "caption"),
    MixSource("caption", "C", ("describe", "big_shape", "colour", "shape", "count", "count_shape",
                               "count_colour"), "coco (conversations, descriptions)", "caption"),
    MixSource("chart", "O", ("chart",), "ocr (reading what an image shows in writing)",
              "caption"),
    MixSource("yesno", "T", ("exists", "yes_no"), "textvqa (short answers)", "yesno"),
    MixSource("vqa", "G", ("short",), "gqa (compositional questions, one-word answers)", "word"),
    MixSource("grounding", "V", ("position",), "vg (regions and where they are)", "caption"),
)
MIX_DIR = "LLaVA665k-micro"


def split_general(records: list[dict]) -> dict[str, list[dict]]:
    """The general mix's training records by source (records carry their ``category``)."""
    return {s.name: [r for r in records if r.get("category") in s.kinds] for s in MIX_SOURCES}


def generate_mix_test(seed: int, source: MixSource, n: int, size: int) -> Iterator[Example]:
    """Held-out questions of ``source``'s kinds, in the mix's proportions."""
    return generate_general(seed, n, size, f"mix-test-{source.name}", source.kinds)
