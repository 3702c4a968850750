"""Models assembled around shared weights (an evaluation model built on the trained one)."""

from __future__ import annotations

import copy
import itertools

import torch


def shallow_copy(model: torch.nn.Module, own: torch.nn.Module | None = None) -> torch.nn.Module:
    """A copy of the module tree that shares every parameter and buffer with ``model`` (hooks or
    replaced submodules on the copy leave ``model`` untouched, at no memory cost), except those
    of its submodule ``own``, which are copied."""
    mine = {id(t) for t in itertools.chain(own.parameters(), own.buffers())} if own else set()
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())
            if id(t) not in mine}
    return copy.deepcopy(model, memo)
