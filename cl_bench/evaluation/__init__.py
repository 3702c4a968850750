"""Evaluation: batched generation, general benchmarks (lmms-eval) and degradation probes."""
