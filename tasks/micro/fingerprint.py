"""What a base build is and what it must give: its fingerprint record and the check against the
reference build.

A build writes ``build.json`` beside its models: the config and its hash, the hash of the
generated world's files, the package versions and numeric environment it ran under, the hash of
every weights file, and its stage-0 scores (each ``ucit-micro`` task, micro MME and POPE accuracy,
mean words of the open answers). ``reference.json`` beside this module is that record for the
default config as built on the reference machine; ``differences`` names what a build does not
share with it.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "tokenizers", "pillow", "numpy", "peft", "safetensors")
REFERENCE = Path(__file__).with_name("reference.json")
SCORE_TOLERANCE = 0.005  # stage-0 scores must agree to two decimals


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def numeric_environment() -> dict[str, object]:
    """What decides float results on a CPU: the architecture, the vector instruction set torch
    uses, and the thread count."""
    import torch

    return {
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


def tree_sha256(folder: Path) -> str:
    """One hash of every file under ``folder`` (relative paths and bytes, in sorted order)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder).as_posix()).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def weights_sha256(folder: Path) -> dict[str, str]:
    """The hash of each model's weights file under a base folder, by model name."""
    return {
        path.parent.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.glob("*/model.safetensors"))
    }


def read_record(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def differences(record: dict, reference: dict) -> list[str]:
    """What ``record`` does not share with ``reference`` (same config fingerprint), worded for a
    warning; empty when the weights and stage-0 scores are the reference's."""
    found = []
    if record.get("world_sha256") != reference.get("world_sha256"):
        found.append("the generated world's files differ")
    if record.get("weights_sha256") != reference.get("weights_sha256"):
        found.append("the model weights differ")
    for name, value in reference.get("stage0", {}).items():
        mine = record.get("stage0", {}).get(name)
        if mine is None or abs(mine - value) > SCORE_TOLERANCE:
            found.append(f"stage-0 {name} is {_fmt(mine)} here, {_fmt(value)} in the reference")
    if not found:
        return []
    for section in ("versions", "environment"):
        ours, theirs = record.get(section, {}), reference.get(section, {})
        for key in sorted(set(ours) | set(theirs)):
            if ours.get(key) != theirs.get(key):
                found.append(f"{key} {ours.get(key)} here, {theirs.get(key)} in the reference")
    return found


def _fmt(value: float | None) -> str:
    return "missing" if value is None else f"{value:.2f}"
