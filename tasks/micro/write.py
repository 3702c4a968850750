"""Writing the micro world to disk in the real formats and layout, atomically and cached.

Layout under ``<root>/<fingerprint>/``::

    UCIT/<Task>/train.json, test.json          (images under UCIT/datasets/<Task>/<split>/)
    general/train.json                         (images under general/images/)
    general/inquiries.json, probes.json        (probe images under general/probes/)
    LLaVA665k-micro/<source>/train.json, test.json  (images under general/, tests' in mix-test/)
    general/bench/mme.json, pope_<split>.json, open.json   (images under general/bench/<name>/)
    pretrain/clip.json, align.json, text.json  (images under pretrain/clip/, pretrain/align/)
    manifest.json
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from tasks.micro.benchmarks import POPE_PER_IMAGE, POPE_SPLITS, generate_mme, generate_pope
from tasks.micro.fingerprint import tree_sha256
from tasks.micro.general import generate_general, generate_inquiries, generate_open, generate_probes
from tasks.micro.mix665k import MIX_DIR, MIX_SOURCES, generate_mix_test, split_general
from tasks.micro.pretrain import generate_alignment, generate_clip, generate_text_chat
from tasks.micro.records import (
    Example,
    caption_record,
    inquiry_record,
    test_record,
    train_record,
)
from tasks.micro.tasks import MICRO_TASKS, generate
from tasks.micro.world import FORMAT_VERSION, MicroWorldConfig

Formatter = Callable[[str, str | None, Example], dict]


class _Writer:
    """Saves images and JSON files under ``base``, counting records, advancing a bar."""

    def __init__(self, base: Path, bar: tqdm) -> None:
        self.base = base
        self.bar = bar
        self.counts: dict[str, int] = {}
        self.images = 0

    def image(self, img: Image.Image, image_root: str, rel: str) -> str:
        path = self.base / image_root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, format="PNG", compress_level=6)  # PIL writes no timestamp chunk
        self.images += 1
        return rel

    def records(self, examples: Iterable[Example], image_root: str, image_dir: str,
                id_prefix: str, fmt: Formatter) -> list[dict]:
        """One record per example, ids ``<prefix>-000001``..., images ``<dir>/000001.png``."""
        out = []
        for i, ex in enumerate(examples, 1):
            rel = None
            if ex.image is not None:
                rel = self.image(ex.image, image_root, f"{image_dir}/{i:06d}.png")
            out.append(fmt(f"{id_prefix}-{i:06d}", rel, ex))
            self.bar.update()
        return out

    def json(self, rel: str, records: list[dict]) -> None:
        path = self.base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", "utf-8")
        self.counts[rel] = len(records)


def total_records(config: MicroWorldConfig) -> int:
    """How many records (and probes, inquiries, benchmark images) a config generates."""
    n_pope = max(1, -(-config.n_bench // (2 * POPE_PER_IMAGE)))
    return (len(MICRO_TASKS) * (config.n_train + config.n_test) + config.n_general
            + config.n_inquiry + config.n_probe + max(1, config.n_bench // 2) + n_pope
            + config.n_bench + len(MIX_SOURCES) * config.n_test + config.n_clip
            + config.n_align + config.n_text)


def write_world(base: Path, config: MicroWorldConfig, progress: bool = False) -> dict:
    """Write every file of the micro world under ``base``; returns the manifest."""
    seed, size = config.seed, config.image_size
    with tqdm(total=total_records(config), desc="micro world", unit="rec",
              disable=not progress) as bar:
        w = _Writer(base, bar)
        for task in MICRO_TASKS:
            for split, n in (("train", config.n_train), ("test", config.n_test)):
                fmt = train_record if split == "train" else test_record
                recs = w.records(generate(task, seed, split, n, size), "UCIT/datasets",
                                 f"{task.name}/{split}", f"{task.name}-{split}", fmt)
                w.json(f"UCIT/{task.name}/{split}.json", recs)
        g = "general"
        general = w.records(generate_general(seed, config.n_general, size), g, "images",
                            "general", train_record)
        w.json(f"{g}/train.json", general)
        split = split_general(general)
        for source in MIX_SOURCES:
            name = source.name
            w.json(f"{MIX_DIR}/{name}/train.json", split[name])
            tests = generate_mix_test(seed, source, config.n_test, size)
            w.json(f"{MIX_DIR}/{name}/test.json",
                   w.records(tests, g, f"mix-test/{name}", f"{name}-test", test_record))
        w.json(f"{g}/inquiries.json", w.records(generate_inquiries(seed, config.n_inquiry), g,
                                                "inquiries", "inquiry", inquiry_record))
        w.json(f"{g}/probes.json", w.records(generate_probes(seed, config.n_probe, size), g,
                                             "probes", "probe", inquiry_record))
        _write_mme(w, config)
        _write_pope(w, config)
        w.json(f"{g}/bench/open.json", w.records(generate_open(seed, config.n_bench, size), g,
                                                 "bench/open", "open", test_record))
        p = "pretrain"
        w.json(f"{p}/clip.json", w.records(generate_clip(seed, config.n_clip, size), p, "clip",
                                           "clip", caption_record))
        w.json(f"{p}/align.json", w.records(generate_alignment(seed, config.n_align, size), p,
                                            "align", "align", train_record))
        w.json(f"{p}/text.json", w.records(generate_text_chat(seed, config.n_text), p, "text",
                                           "text", train_record))
        return {
            "format_version": FORMAT_VERSION,
            "content_sha256": tree_sha256(base),
            "fingerprint": config.fingerprint(),
            "config": asdict(config),
            "counts": w.counts,
            "images": w.images,
        }


def _write_mme(w: _Writer, config: MicroWorldConfig) -> None:
    records = []
    for i, item in enumerate(generate_mme(config.seed, config.n_bench, config.image_size), 1):
        rel = w.image(item.image, "general", f"bench/mme/{i:06d}.png")
        for ex in item.questions:
            ex.extra["pair_id"] = f"mme-{i:06d}"
            records.append(test_record(f"mme-{len(records) + 1:06d}", rel, ex))
        w.bar.update()
    w.json("general/bench/mme.json", records)


def _write_pope(w: _Writer, config: MicroWorldConfig) -> None:
    splits: dict[str, list[dict]] = {s: [] for s in POPE_SPLITS}
    for i, item in enumerate(generate_pope(config.seed, config.n_bench, config.image_size), 1):
        rel = w.image(item.image, "general", f"bench/pope/{i:06d}.png")
        for split, questions in item.questions.items():
            for ex in questions:
                ex.extra["image_id"] = f"pope-{i:06d}"
                qid = f"pope-{split}-{len(splits[split]) + 1:06d}"
                splits[split].append(test_record(qid, rel, ex))
        w.bar.update()
    for split, records in splits.items():
        w.json(f"general/bench/pope_{split}.json", records)


def generate_micro_world(root: Path, config: MicroWorldConfig, progress: bool = False) -> Path:
    """The micro world of ``config`` under ``root/<fingerprint>/``, generated if missing.

    Generation writes to a temporary folder renamed into place at the end, so a folder that
    exists is complete; an existing folder is returned as it is.
    """
    root = Path(root)
    final = root / config.fingerprint()
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        manifest = write_world(staging, config, progress)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", "utf-8")
        os.chmod(staging, 0o755)
        try:
            staging.rename(final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(staging, ignore_errors=True)  # another process finished first
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final
