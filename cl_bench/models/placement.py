"""Where tensors live and in which precision: the one helper every tensor the project makes goes
through.

The model decides: batches, inquiries, probes, routing weights and stored updates are moved to
the device of the model they meet (``to_model``), never to a device named anywhere else. The run
config names the device (``auto | cpu | cuda | cuda:N``; ``cuda`` is ``cuda:LOCAL_RANK`` under a
launcher) and the dtype of the frozen weights (``auto``: bfloat16 on CUDA, float32 elsewhere).
What trains or accumulates (LoRA, the projector, consolidated updates) stays float32.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from cl_bench.errors import CLBenchError

DEVICES = ("auto", "cpu", "cuda")
DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
    "fp32": torch.float32, "float32": torch.float32,
}


def local_rank() -> int:
    """This process's GPU index under a launcher (torchrun, deepspeed, accelerate), else 0."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto``: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU; ``cuda`` (or
    ``cuda:N``) without CUDA is an error, not a silent fall back to the CPU."""
    name = spec.strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise CLBenchError(f"model.device={spec}: CUDA is not available here (torch "
                               f"{torch.__version__}); use --device cpu or auto")
        index = local_rank() if name == "cuda" else int(name.partition(":")[2])
        if index >= torch.cuda.device_count():
            raise CLBenchError(f"model.device={spec}: GPU {index} requested, "
                               f"{torch.cuda.device_count()} visible")
        return torch.device("cuda", index)
    raise CLBenchError(f"model.device={spec!r}: expected one of {', '.join(DEVICES)} or cuda:N")


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA (float16 on GPUs without bfloat16), float32 elsewhere."""
    name = spec.strip().lower()
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in DTYPES:
        raise CLBenchError(f"model.dtype={spec!r}: expected auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]


def device_of(model: torch.nn.Module) -> torch.device:
    """The device of a model (of its first parameter)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype activations run in: that of the input embeddings (the frozen weights)."""
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    if embeddings is not None:
        return embeddings.weight.dtype
    return next(model.parameters()).dtype


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with every tensor on ``device`` (other values unchanged)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def to_model(batch: Mapping[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """The batch on the model's device: what every forward the project makes itself feeds."""
    return to_device(batch, device_of(model))


def is_low_precision(dtype: torch.dtype) -> bool:
    """Whether small updates merged into weights of this dtype would be rounded away."""
    return dtype in (torch.bfloat16, torch.float16)


def keep_float32(module: torch.nn.Module) -> None:
    """Hold ``module``'s parameters in float32 inside a low-precision model: its inputs are cast
    to float32 on the way in (the model casts its output back where it needs to)."""
    module.float()
    if not getattr(module, "_clbench_float32", False):
        module.register_forward_pre_hook(_inputs_to_float32)
        module._clbench_float32 = True


def _inputs_to_float32(_module: torch.nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)
