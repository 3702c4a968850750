"""Evaluation throughput: cl-bench's batched generation against a one-sample-at-a-time loop.

The loop is what the reference repositories' evaluation scripts do for each test line (open the
image, build the prompt, ``generate`` greedily, decode), on the same prompts with the same greedy
settings. Both run on the same model in one process, on ``--limit`` test samples of each of
ucit-micro's six tasks (the batched path one task at a time, as the runner calls it). The script
prints (and with ``--out`` writes) both throughputs, their ratio, whether the predictions are
identical, and the load average, since a shared machine slows both loops.

    CLBENCH_CACHE=... python benchmarks/eval_speed.py [--limit 40] [--model PATH] [--out FILE]

Without ``--model`` it uses the micro world's base model, built first if the cache lacks it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (as in sac_speed.py): on a shared machine
# spinning threads stall each other, which would time the load rather than the loops.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from cl_bench.config import RunConfig, resolve  # noqa: E402
from cl_bench.evaluation.generation import generate_answers, greedy_config  # noqa: E402
from cl_bench.models.batching import collate_batch, prompt_item  # noqa: E402
from cl_bench.models.llava import ModelBundle, load_llava  # noqa: E402
from cl_bench.models.placement import device_of, to_model  # noqa: E402
from cl_bench.registry import get_suite  # noqa: E402
from cl_bench.running.runner import cache_dir, load_test_sets, resolve_data_root, resolve_model  # noqa: E402
from tasks.loaders import Sample  # noqa: E402

SUITE = "ucit-micro"


@torch.no_grad()
def one_at_a_time(bundle: ModelBundle, samples: list[Sample], max_new_tokens: int
                  ) -> dict[str, str]:
    """The reference repositories' loop: one prompt, one ``generate``, one decode per sample."""
    model = bundle.model.eval()
    config = greedy_config(bundle, max_new_tokens)
    answers = {}
    for s in samples:
        batch = to_model(collate_batch([prompt_item(bundle, s.question, s.image)], bundle), model)
        out = model.generate(**batch, generation_config=config)
        text = bundle.tokenizer.decode(out[0, batch["input_ids"].shape[1] :],
                                       skip_special_tokens=True)
        answers[s.id] = text.strip()
    return answers


def timed(run) -> tuple[dict[str, str], float]:
    start = time.perf_counter()
    answers = run()
    return answers, time.perf_counter() - start


def batched_by_task(bundle: ModelBundle, test_sets: dict[str, list[Sample]], cfg: RunConfig
                    ) -> dict[str, str]:
    """cl-bench's evaluation as the runner calls it: one task at a time."""
    ev, answers = cfg.eval, {}
    for task, samples in test_sets.items():
        answers |= generate_answers(bundle.model, bundle, samples, ev.batch_size,
                                    ev.max_new_tokens, task, workers=ev.workers)
    return answers


def measure(cfg: RunConfig, test_sets: dict[str, list[Sample]]) -> dict:
    suite = get_suite(cfg.suite)
    bundle = load_llava(resolve_model(suite, cfg), cfg.model)
    ev = cfg.eval
    samples = [s for task_samples in test_sets.values() for s in task_samples]
    warm = samples[: min(4, len(samples))]
    one_at_a_time(bundle, warm, ev.max_new_tokens)
    generate_answers(bundle.model, bundle, warm, ev.batch_size, ev.max_new_tokens)
    load_before = os.getloadavg()
    batched, t_batched = timed(lambda: batched_by_task(bundle, test_sets, cfg))
    single, t_single = timed(lambda: one_at_a_time(bundle, samples, ev.max_new_tokens))
    differ = [i for i in single if single[i] != batched[i]]
    return {
        "samples": len(samples),
        "device": str(device_of(bundle.model)),
        "dtype": str(bundle.model.dtype),
        "torch_threads": torch.get_num_threads(),
        "batch_size": ev.batch_size,
        "workers": ev.workers,
        "max_new_tokens": ev.max_new_tokens,
        "one_at_a_time": {"seconds": round(t_single, 2),
                          "samples_per_s": round(len(samples) / t_single, 2)},
        "batched": {"seconds": round(t_batched, 2),
                    "samples_per_s": round(len(samples) / t_batched, 2)},
        "speedup": round(t_single / t_batched, 2),
        "identical": not differ,
        "differing": len(differ),
        "differing_examples": [{"id": i, "one_at_a_time": single[i], "batched": batched[i]}
                               for i in differ[:5]],
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=40, help="test samples per task")
    parser.add_argument("--model", help="a LLaVA folder (default: the micro base model)")
    parser.add_argument("--batch-size", type=int, help="default: the suite's eval.batch_size")
    parser.add_argument("--workers", type=int, default=None, help="image workers (eval.workers)")
    parser.add_argument("--max-new-tokens", type=int, help="default: the suite's")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, help="also write the numbers here (JSON)")
    args = parser.parse_args()
    overrides = [f"eval.limit={args.limit}", f"model.device={args.device}"]
    if args.batch_size:
        overrides.append(f"eval.batch_size={args.batch_size}")
    if args.max_new_tokens:
        overrides.append(f"eval.max_new_tokens={args.max_new_tokens}")
    cfg = resolve(None, overrides, lambda name: get_suite(name).defaults, suite=SUITE,
                  model=args.model)
    cfg.eval.workers = args.workers
    suite = get_suite(SUITE)
    tasks = suite.resolve_order(None)
    test_sets = load_test_sets(suite, tasks, resolve_data_root(suite, cfg), cfg)
    samples = [s for task in tasks for s in test_sets[task.name]]
    if len({s.id for s in samples}) != len(samples):
        raise SystemExit("test sample ids repeat across tasks: answers are matched by id")
    print(f"[eval_speed] {len(samples)} samples from {len(tasks)} tasks, cache {cache_dir()}",
          flush=True)
    result = measure(cfg, test_sets)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
