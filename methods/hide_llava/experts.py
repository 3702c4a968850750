"""What each HiDe-LLaVA stage leaves behind (its LoRA, projector and anchors), stored and
reloaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from cl_bench.errors import CLBenchError
from cl_bench.models.deltas import LoraFactors, load_lora_file, save_lora_file


# -- stored experts ------------------------------------------------------------------------------
@dataclass
class TaskExpert:
    """What one stage leaves behind: its LoRA factors, projector and anchors (eq. 2)."""

    task: str
    stage: int
    lora: dict[str, LoraFactors]
    projector: dict[str, torch.Tensor] = field(default_factory=dict)
    image_anchor: torch.Tensor | None = None
    text_anchor: torch.Tensor | None = None
    anchor_samples: int = 0
    image_samples: int = 0
    encoder: str = ""

    @property
    def file_name(self) -> str:
        return f"task_{self.stage}.safetensors"

    def save(self, folder: Path) -> Path:
        tensors = {f"projector::{name}": t for name, t in self.projector.items()}
        if self.image_anchor is not None:
            tensors["anchor::image"] = self.image_anchor
        if self.text_anchor is not None:
            tensors["anchor::text"] = self.text_anchor
        meta = {
            "task": self.task, "stage": str(self.stage), "encoder": self.encoder,
            "anchor_samples": str(self.anchor_samples), "image_samples": str(self.image_samples),
        }
        return save_lora_file(folder / self.file_name, self.lora, tensors, meta)

    @classmethod
    def load(cls, path: Path) -> TaskExpert:
        if not path.is_file():
            raise CLBenchError(f"HiDe-LLaVA expert file {path} is missing")
        lora, tensors, meta = load_lora_file(path)
        projector = {
            k.split("::", 1)[1]: t for k, t in tensors.items() if k.startswith("projector::")
        }
        return cls(
            meta["task"], int(meta["stage"]), lora, projector, tensors.get("anchor::image"),
            tensors.get("anchor::text"), int(meta.get("anchor_samples", 0)),
            int(meta.get("image_samples", 0)), meta.get("encoder", ""),
        )

    def check_anchors(self, where: Path | str) -> None:
        """A routed model needs both anchors (the image one unless the task had no images)."""
        missing = [
            kind for kind, anchor, needed in (
                ("text", self.text_anchor, True),
                ("image", self.image_anchor, self.image_samples > 0),
            ) if needed and anchor is None
        ]
        if missing:
            raise CLBenchError(
                f"{where}: stage {self.stage} ({self.task}) has no {' or '.join(missing)} anchor; "
                "HiDe-LLaVA routes the top layer by the anchors saved with each stage (eq. 2)"
            )


def load_experts(folder: Path) -> list[TaskExpert]:
    """Every expert file of a folder (a checkpoint's or a run's ``hide_llava/``), by stage."""
    files = sorted(folder.glob("task_*.safetensors"),
                   key=lambda p: int(p.stem.removeprefix("task_")))
    if not files:
        raise CLBenchError(f"no HiDe-LLaVA expert files (task_<stage>.safetensors) in {folder}")
    return [TaskExpert.load(path) for path in files]



def set_projector(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load stored projector weights into ``model``."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            if name not in params:
                raise CLBenchError(f"stored projector parameter {name!r} is absent from the model")
            params[name].copy_(value.to(params[name]))
