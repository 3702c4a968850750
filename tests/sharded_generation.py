"""Run under ``torchrun --nproc_per_node N`` (gloo) by tests/test_generation.py: every rank
generates its share of the test prompts with ``sharded=True``; rank 0 writes what it gathered."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from cl_bench.evaluation.generation import generate_texts
from cl_bench.evaluation.sharding import on_main, world
from cl_bench.models.llava import load_llava
from tasks.loaders import load_samples


def main(model: str, test_file: str, out: str) -> None:
    dist.init_process_group("gloo")
    bundle = load_llava(model)
    samples = load_samples(Path(test_file), Path(test_file).parent.parent / "datasets")
    prompts = [(s.question, s.image) for s in samples] + [("What colour?", None)]
    seen: list[int] = []
    texts = generate_texts(bundle.model, bundle, prompts, 2, 6, workers=1, sharded=True,
                           before_batch=lambda rows: seen.append(len(rows)))
    rows = sum(seen)
    counts = [None] * world()[1]
    dist.all_gather_object(counts, rows)
    on_main(lambda: Path(out).write_text(json.dumps({"texts": texts, "rows": counts})))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
