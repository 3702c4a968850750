"""Small files in the micro world's general formats, written by the tests themselves."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw


def write_bench(root: Path, mme: list[tuple[str, str]], pope: dict[str, list[tuple[str, str]]],
                open_qs: list[tuple[str, list[str], bool]]) -> Path:
    """``<root>/general/bench`` in the micro world's format; (question, answer) lists."""
    bench = root / "general" / "bench"
    (bench / "img").mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate([(220, 40, 40), (40, 200, 60), (50, 80, 230)]):
        img = Image.new("RGB", (32, 32))
        ImageDraw.Draw(img).ellipse([6, 6, 26, 26], fill=colour)
        img.save(bench / "img" / f"{i}.png")
    records = [{"question_id": f"mme-{i}", "image": f"bench/img/{i // 2 % 3}.png", "text": q,
                "answer": a, "pair_id": f"pair-{i // 2}", "category": "existence"}
               for i, (q, a) in enumerate(mme)]
    (bench / "mme.json").write_text(json.dumps(records))
    for split, items in pope.items():
        records = [{"question_id": f"pope-{split}-{i}", "image": f"bench/img/{i % 3}.png",
                    "text": q, "answer": a, "image_id": f"pope-{i % 3}"}
                   for i, (q, a) in enumerate(items)]
        (bench / f"pope_{split}.json").write_text(json.dumps(records))
    records = []
    for i, (q, refs, with_image) in enumerate(open_qs):
        record = {"question_id": f"open-{i}", "text": q, "answer": refs[0], "references": refs}
        if with_image:
            record["image"] = f"bench/img/{i % 3}.png"
        records.append(record)
    (bench / "open.json").write_text(json.dumps(records))
    return root


def write_probes(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / "red.png")
    records = [{"id": "p1", "text": "Tell me about the sky."},
               {"id": "p2", "text": "What is in this picture?", "image": "red.png"},
               {"id": "p3", "text": "Why do people sleep?"}]
    (folder / "probes.json").write_text(json.dumps(records))
    return folder / "probes.json"
