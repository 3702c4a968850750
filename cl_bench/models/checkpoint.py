"""What a stage checkpoint holds of the model: what changed since the starting model (the
consolidated updates, the trained full parameters such as the projector) and a pointer to the
starting model's folder with its fingerprint, never a copy of it (14 GB per stage at 7B).

``model.safetensors`` holds the tensors (float32, on the CPU) and ``base.json`` the pointer;
loading replays the updates onto a freshly loaded starting model in their stage order, which
gives the model the run had, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cl_bench.errors import CLBenchError
from cl_bench.models.deltas import strip_prefix
from cl_bench.models.prompting import PROMPT_MODULE
from cl_bench.models.updates import load_updates_state, updates_state

MODEL_FILE = "model.safetensors"
BASE_FILE = "base.json"
_HEAD_BYTES = 1 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def fingerprint(folder: Path) -> str:
    """A cheap identity of a model folder: its config.json and each weight file's name, size
    and first MiB (the safetensors header naming every tensor, and the first weights)."""
    digest = hashlib.sha256()
    digest.update((folder / "config.json").read_bytes())
    for path in sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES):
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
        with open(path, "rb") as f:
            digest.update(f.read(_HEAD_BYTES))
    return digest.hexdigest()[:16]


def trained_names(model: torch.nn.Module) -> set[str]:
    """The trainable parameters that are not LoRA factors (the projector), PEFT prefix off.
    Input prompts (``cl_bench.models.prompting``) are not part of the model: their method saves
    them."""
    return {strip_prefix(n) for n, p in model.named_parameters()
            if p.requires_grad and "lora_" not in n and not n.startswith(f"{PROMPT_MODULE}.")}


def save_model_state(model: torch.nn.Module, folder: Path, base: Path,
                     trained: Iterable[str]) -> None:
    """Write the model's changes since ``base`` (its updates and the ``trained`` parameters)."""
    tensors, metadata = updates_state(model)
    params = dict(model.named_parameters())
    for name in sorted(trained):
        if name not in params:
            raise CLBenchError(f"trained parameter {name} is no longer in the model")
        tensors[f"param::{name}"] = params[name].detach().contiguous().cpu()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / MODEL_FILE), metadata=metadata)
    pointer = {"path": str(base.resolve()), "fingerprint": fingerprint(base)}
    (folder / BASE_FILE).write_text(json.dumps(pointer, indent=2))


def load_model_state(model: torch.nn.Module, folder: Path, base: Path) -> set[str]:
    """Apply a checkpoint's changes to ``model``, the freshly loaded starting model of
    ``base``; returns the names of the trained parameters it set."""
    pointer_file, tensors_file = folder / BASE_FILE, folder / MODEL_FILE
    if not (pointer_file.is_file() and tensors_file.is_file()):
        raise CLBenchError(f"{folder} is not a stage checkpoint ({BASE_FILE} and {MODEL_FILE} "
                           "expected); it may come from an older cl-bench: start the run again")
    pointer = json.loads(pointer_file.read_text())
    if pointer["fingerprint"] != fingerprint(base):
        raise CLBenchError(
            f"{folder} was trained from {pointer['path']} (fingerprint {pointer['fingerprint']})"
            f", but the run's starting model {base} differs: resume with the same --model"
        )
    with safe_open(str(tensors_file), "pt") as f:
        metadata = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    params = dict(model.named_parameters())
    trained = set()
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("param::"):
                name = key.removeprefix("param::")
                if name not in params:
                    raise CLBenchError(f"{tensors_file}: parameter {name} is not in the model")
                params[name].copy_(value)
                trained.add(name)
    load_updates_state(model, tensors, metadata)
    return trained
