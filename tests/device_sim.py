"""A second device on a CPU-only machine, to catch tensors made on the wrong device.

``simulated_accelerator()`` makes the ``meta`` device behave as an accelerator holding real
data: a tensor created on it (``device="meta"``, ``.to("meta")``) is an ``OnAccelerator`` whose
values live in a CPU tensor, so models run, generate and train on it with real numbers. Every
operation that mixes such a tensor with an ordinary (CPU) tensor of one or more dimensions raises
``DeviceMismatch`` naming the operation, as CUDA raises "Expected all tensors to be on the same
device". As on CUDA, CPU scalars (0-dim tensors), cross-device ``copy_`` and CPU index tensors
are allowed. A model moved to ``meta`` inside the context therefore fails on the first tensor
any code path creates without following the model's device.

``accelerator_runs(monkeypatch)`` additionally makes runs place their model there (as
``--device cuda`` would on a GPU machine) and lets the Trainer and Accelerate use it as their
device, so that training, evaluation, probes, general benchmarks, checkpoints and analyses all
run on the simulated accelerator.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors
from torch.utils._python_dispatch import TorchDispatchMode

ACCELERATOR = torch.device("meta")
aten = torch.ops.aten
# operations CUDA runs across devices: copies, and CPU index tensors into device tensors
CROSS_DEVICE_OK = {aten.copy_.default, aten._to_copy.default, aten.lift_fresh.default}
INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
             aten._index_put_impl_.default}


class DeviceMismatch(RuntimeError):
    """A tensor on the CPU met a tensor on the (simulated) accelerator."""


class OnAccelerator(torch.Tensor):
    """A tensor on the simulated accelerator; its values are the CPU tensor ``data_``."""

    @staticmethod
    def __new__(cls, data: torch.Tensor) -> OnAccelerator:
        tensor = torch.Tensor._make_wrapper_subclass(
            cls, data.shape, strides=data.stride(), storage_offset=data.storage_offset(),
            dtype=data.dtype, layout=data.layout, device=ACCELERATOR,
            requires_grad=data.requires_grad,
        )
        tensor.data_ = data
        return tensor

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self) -> str:
        return f"OnAccelerator({self.data_!r})"

    def tolist(self):
        return self.data_.tolist()

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert an accelerator tensor to numpy: use .cpu() first")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _on_accelerator(device) -> bool:
    return device is not None and torch.device(device).type == ACCELERATOR.type


def _leaves(tree) -> list:
    """The leaves of nested tuples, lists and dicts (an operation's arguments)."""
    if isinstance(tree, list | tuple):
        return [leaf for item in tree for leaf in _leaves(item)]
    if isinstance(tree, dict):
        return [leaf for item in tree.values() for leaf in _leaves(item)]
    return [tree]


def _map(fn, tree):
    if isinstance(tree, list | tuple):
        return type(tree)(_map(fn, item) for item in tree) if not hasattr(tree, "_fields") \
            else type(tree)(*(_map(fn, item) for item in tree))
    if isinstance(tree, dict):
        return {key: _map(fn, item) for key, item in tree.items()}
    return fn(tree)


def _check(func, leaves: list) -> None:
    if func in CROSS_DEVICE_OK:
        return
    indices: set[int] = set()
    stray = [t for t in leaves if isinstance(t, torch.Tensor)
             and not isinstance(t, OnAccelerator) and t.dim() > 0]
    if stray and func in INDEX_OPS:
        indices = {id(t) for t in _leaves(_ARGS[0][1]) if isinstance(t, torch.Tensor)}
        stray = [t for t in stray if id(t) not in indices]
    if stray:
        shapes = ", ".join(str(tuple(t.shape)) for t in stray)
        raise DeviceMismatch(f"{func}: CPU tensor(s) of shape {shapes} used with tensors on the "
                             "accelerator (a tensor made without the model's device)")


_ARGS: list = [None]


def _unwrap(value):
    if isinstance(value, OnAccelerator):
        return value.data_
    if isinstance(value, torch.device) and value.type == ACCELERATOR.type:
        return torch.device("cpu")
    return value


def _wrap(value):
    if isinstance(value, torch.Tensor) and not isinstance(value, OnAccelerator):
        return OnAccelerator(value)
    return value


def _run(func, args, kwargs):
    leaves = _leaves((args, kwargs))
    on = any(isinstance(t, OnAccelerator) for t in leaves)
    if on:
        _ARGS[0] = args
        _check(func, leaves)
    to_accelerator = _on_accelerator(kwargs.get("device"))
    leaving = func is aten._to_copy.default and "device" in kwargs and not to_accelerator
    out = func(*_map(_unwrap, args), **_map(_unwrap, kwargs))
    return _map(_wrap, out) if to_accelerator or (on and not leaving) else out


class _Mode(TorchDispatchMode):
    """Routes factory calls and copies aimed at the accelerator to ``_run``."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _on_accelerator(kwargs.get("device")) or any(
            issubclass(t, OnAccelerator) for t in types
        ):
            return _run(func, args, kwargs)
        return func(*args, **kwargs)


class _Constructors(TorchFunctionMode):
    """``torch.tensor(..., device=accelerator)`` and kin build on the CPU, then move."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _device_constructors() and _on_accelerator(kwargs.get("device")):
            return func(*args, **{**kwargs, "device": "cpu"}).to(ACCELERATOR)
        return func(*args, **kwargs)


@contextmanager
def simulated_accelerator() -> Iterator[torch.device]:
    """Inside, ``meta`` is an accelerator with real values (see the module docstring)."""
    with _Mode(), _Constructors():
        yield ACCELERATOR


@contextmanager
def accelerator_runs(monkeypatch) -> Iterator[torch.device]:
    """Runs (``load_llava``) place models on the simulated accelerator, the Trainer's and
    Accelerate's device is that accelerator, and fused AdamW accepts it, as CUDA does."""
    from accelerate import Accelerator
    from transformers import TrainingArguments

    import cl_bench.models.llava

    monkeypatch.setattr(cl_bench.models.llava, "resolve_device", lambda spec: ACCELERATOR)
    monkeypatch.setattr(TrainingArguments, "device",
                        property(lambda self: (self._setup_devices, ACCELERATOR)[1]))
    monkeypatch.setattr(Accelerator, "device", property(lambda self: ACCELERATOR))
    adam = importlib.import_module("torch.optim.adam")
    monkeypatch.setattr(adam, "_device_dtype_check_for_fused",
                        lambda params, cuda_unsupported=False: None)
    with simulated_accelerator() as device:
        yield device
