"""Run under ``torchrun --nproc_per_node 2`` (gloo) by tests/test_generation.py: the sharded
parts of the evaluation on each rank; rank 0 writes what every rank ended with."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from cl_bench.errors import CLBenchError
from cl_bench.evaluation.generation import generate_texts
from cl_bench.evaluation.probes import Inquiry, probe_model
from cl_bench.evaluation.routing_counts import RoutingCounts
from cl_bench.evaluation.sharding import on_main, world
from cl_bench.models.llava import load_llava
from tasks.loaders import load_samples


def sharded_prompts(test_file: Path) -> list[tuple]:
    samples = load_samples(test_file, test_file.parent.parent / "datasets")
    return [(s.question, s.image) for s in samples] + [("What colour?", None)]


def inquiries(test_file: Path) -> list[Inquiry]:
    return [Inquiry(str(i), q, image) for i, (q, image) in enumerate(sharded_prompts(test_file))]


def fail_on_rank0() -> None:
    raise CLBenchError("boom")


def main(model: str, test_file: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank = world()[0]
    bundle = load_llava(model)
    rows: list[int] = []
    texts = generate_texts(bundle.model, bundle, sharded_prompts(Path(test_file)), 2, 6,
                           workers=1, sharded=True,
                           before_batch=lambda batch: rows.append(len(batch)))
    probed = probe_model(bundle.model, bundle, inquiries(Path(test_file)), 2, 4, sharded=True)
    counts = RoutingCounts(["r0", "r1"])
    counts.add("r0", [rank])
    total = counts.total()
    try:
        on_main(fail_on_rank0)
        error = None
    except CLBenchError as err:
        error = str(err)
    seen = [None] * world()[1]
    dist.all_gather_object(seen, {"rows": sum(rows), "error": error, "counts": total})
    if rank == 0:
        torch.save(probed.hidden, Path(out).with_suffix(".pt"))
        Path(out).write_text(json.dumps({"texts": texts, "probe_answers": probed.answers,
                                         "ranks": seen}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
