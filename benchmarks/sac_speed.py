"""SAC speed on a LLaVA-1.5-7B-shaped LoRA: factored path vs full SVD, plus an alpha sweep.

The language model's 32 layers each carry a rank-q LoRA on q, k, v, o (4096 x 4096), gate and up
(11008 x 4096, out x in) and down (4096 x 11008): 224 matrices. Random factors are generated per
matrix from a seeded generator, so memory stays at one matrix's worth.

    python benchmarks/sac_speed.py [--rank 128] [--layers 32] [--sample 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from collections import defaultdict

# Idle OpenMP threads sleep instead of spinning (read when torch loads; an explicit setting wins).
# On a shared 2-core machine spinning threads stall each other: a 4096 x 128 QR took 0.39 s with
# 2 spinning threads under load against 0.007 s idle, with no effect on an idle machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from methods.llava_c.consolidation import (  # noqa: E402
    apply_sac,
    lora_spectrum,
    sac_delta,
    sac_lora_factors,
)

HIDDEN, INTERMEDIATE = 4096, 11008
# (name, (out, in)) of the seven LoRA targets of one decoder layer
PROJECTIONS = (
    ("q_proj", (HIDDEN, HIDDEN)),
    ("k_proj", (HIDDEN, HIDDEN)),
    ("v_proj", (HIDDEN, HIDDEN)),
    ("o_proj", (HIDDEN, HIDDEN)),
    ("gate_proj", (INTERMEDIATE, HIDDEN)),
    ("up_proj", (INTERMEDIATE, HIDDEN)),
    ("down_proj", (HIDDEN, INTERMEDIATE)),
)
SWEEP_ALPHAS = tuple(i / 10 for i in range(11))

Shape = tuple[int, int]


def matrices(layers: int) -> list[tuple[int, str, Shape]]:
    """(index, name, (out, in)) of every LoRA target, in model order."""
    names = [(f"layers.{i}.{name}", shape) for i in range(layers) for name, shape in PROJECTIONS]
    return [(index, name, shape) for index, (name, shape) in enumerate(names)]


def factors(index: int, shape: Shape, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random LoRA factors (B: out x q, A: q x in) of matrix ``index``, reproducible by seed."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    out_dim, in_dim = shape
    A = torch.randn(rank, in_dim, generator=g) / in_dim**0.5
    B = torch.randn(out_dim, rank, generator=g) * 0.01
    return B, A


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def time_factored(args: argparse.Namespace, todo: list[tuple[int, str, Shape]]) -> dict:
    """Consolidate every matrix by the factored path; seconds in total and per shape."""
    total, generation, per_shape = 0.0, 0.0, defaultdict(list)
    for index, _, shape in todo:
        t0 = time.perf_counter()
        B, A = factors(index, shape, args.rank, args.seed)
        t1 = time.perf_counter()
        sac_lora_factors(B, A, args.scaling, args.alpha, args.boundary)
        t2 = time.perf_counter()
        generation += t1 - t0
        total += t2 - t1
        per_shape[shape].append(t2 - t1)
    return {"total": total, "generation": generation, "per_shape": per_shape}


def time_sweep(args: argparse.Namespace, todo: list[tuple[int, str, Shape]]) -> float:
    """Seconds for an 11-alpha sweep: one decomposition per matrix, one rescaling per alpha."""
    total = 0.0
    for index, _, shape in todo:
        B, A = factors(index, shape, args.rank, args.seed)
        t0 = time.perf_counter()
        spectrum = lora_spectrum(B, A, args.scaling)
        for alpha in SWEEP_ALPHAS:
            apply_sac(spectrum, alpha, args.boundary)
        total += time.perf_counter() - t0
    return total


def time_full(args: argparse.Namespace, todo: list[tuple[int, str, Shape]]) -> dict:
    """Full-SVD path (form delta, SVD, rescale, rebuild) on ``--sample`` matrices per shape."""
    seen, per_shape, max_err = defaultdict(int), defaultdict(list), 0.0
    for index, name, shape in todo:
        if seen[shape] >= args.sample:
            continue
        seen[shape] += 1
        B, A = factors(index, shape, args.rank, args.seed)
        t0 = time.perf_counter()
        full = sac_delta(args.scaling * (B @ A), args.alpha, args.boundary)
        per_shape[shape].append(time.perf_counter() - t0)
        P, Q = sac_lora_factors(B, A, args.scaling, args.alpha, args.boundary)
        err = float(torch.linalg.norm(P @ Q - full) / torch.linalg.norm(full))
        max_err = max(max_err, err)
        print(
            f"  full SVD {name:<22} {shape[0]}x{shape[1]}: {per_shape[shape][-1]:7.2f} s, "
            f"rel. Frobenius error vs factored {err:.2e}",
            flush=True,
        )
    return {"per_shape": per_shape, "max_err": max_err}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=128, help="LoRA rank q")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers")
    parser.add_argument("--sample", type=int, default=3, help="full-SVD matrices per shape")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--alpha", type=float, default=0.2)
    parser.add_argument("--scaling", type=float, default=2.0, help="LoRA alpha / r (256 / 128)")
    parser.add_argument("--boundary", default="pad", choices=("pad", "truncate"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    todo = matrices(args.layers)
    counts = defaultdict(int)
    for _, _, shape in todo:
        counts[shape] += 1
    print(
        f"{len(todo)} matrices, rank {args.rank}, alpha {args.alpha}, boundary {args.boundary}, "
        f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
        f"torch {torch.__version__}",
        flush=True,
    )

    factored = time_factored(args, todo)
    print(
        f"factored SAC, whole model: {factored['total']:.2f} s "
        f"(+ {factored['generation']:.2f} s generating random factors)",
        flush=True,
    )
    for shape, times in factored["per_shape"].items():
        print(f"  factored per matrix {shape[0]}x{shape[1]}: {sum(times) / len(times):.4f} s")
    sweep = time_sweep(args, todo)
    print(f"alpha sweep ({len(SWEEP_ALPHAS)} alphas), whole model: {sweep:.2f} s", flush=True)
    print(f"peak RSS after factored runs: {peak_mib():.0f} MiB", flush=True)

    if args.sample < 1:
        print(f"peak RSS: {peak_mib():.0f} MiB (full-SVD sample skipped: --sample 0)")
        return
    full = time_full(args, todo)
    extrapolated = 0.0
    for shape, times in full["per_shape"].items():
        mean = sum(times) / len(times)
        extrapolated += mean * counts[shape]
        print(
            f"full SVD per matrix {shape[0]}x{shape[1]}: {mean:.2f} s "
            f"(mean of {len(times)}; {counts[shape]} in the model)"
        )
    print(
        f"full SVD, whole model (extrapolated): {extrapolated:.1f} s ({extrapolated / 60:.1f} min)"
    )
    print(f"ratio full / factored: {extrapolated / factored['total']:.0f}x")
    print(f"max relative Frobenius error, factored vs full: {full['max_err']:.2e}")
    print(f"peak RSS: {peak_mib():.0f} MiB")


if __name__ == "__main__":
    main()
