"""The device and dtype helper: auto picks the GPU when there is one, never falls back silently."""

from __future__ import annotations

import pytest
import torch

from cl_bench.errors import CLBenchError
from cl_bench.models.placement import resolve_device, resolve_dtype, to_device


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_devices_without_cuda() -> None:
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("CPU")
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(CLBenchError, match=f"model.device={spec}: CUDA is not available"):
            resolve_device(spec)
    with pytest.raises(CLBenchError, match="expected one of auto, cpu, cuda"):
        resolve_device("tpu")


def test_dtypes() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(CLBenchError, match="model.dtype='fp8'"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_batches_move_and_other_values_stay() -> None:
    batch = to_device({"ids": torch.ones(2), "n": 3}, torch.device("meta"))
    assert batch["ids"].device.type == "meta" and batch["n"] == 3
