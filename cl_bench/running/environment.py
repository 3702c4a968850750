"""What a run ran on: package versions, device, precision, processes, code and starting model.

Written into ``config.yaml`` (where the run started) and into every stage record (where each
stage ran), shown in ``report.md``; ``--resume`` compares the code version and the config
(``config_sha256``) with those the run started under.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from cl_bench.models.checkpoint import fingerprint
from cl_bench.models.placement import compute_dtype, device_of
from cl_bench.running.distributed import world_size

PACKAGES = ("torch", "transformers", "peft", "accelerate", "lmms_eval", "deepspeed")


def package_versions() -> dict[str, str | None]:
    """Installed versions (None: not installed), cl-bench's own first."""
    versions: dict[str, str | None] = {}
    for name in ("cl_bench", *PACKAGES):
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    """The commit of the checkout cl_bench runs from, ``+dirty`` with uncommitted changes to
    tracked files; None outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def config_sha256(config: dict) -> str:
    """A digest of a resolved config (``to_dict``), independent of key order."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def environment(model: torch.nn.Module, model_folder: Path, config: dict,
                launcher: str) -> dict:
    """The environment of this process's run (rank 0's; every rank runs the same)."""
    device = device_of(model)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "packages": package_versions(),
        "git_commit": git_commit(),
        "device": str(device),
        "device_name": name,
        "dtype": str(compute_dtype(model)).removeprefix("torch."),
        "world_size": world_size(),
        "launcher": launcher,
        "base_model": str(model_folder),
        "base_model_fingerprint": fingerprint(model_folder),
        "config_sha256": config_sha256(config),
    }


def code_version(env: dict) -> dict:
    """The part of an environment that names the code: cl-bench's version and git commit."""
    return {"cl_bench": env.get("packages", {}).get("cl_bench"),
            "git_commit": env.get("git_commit")}
