"""SEFE (Chen et al., "SEFE: Superficial and Essential Forgetting Eliminator for Multimodal
Continual Instruction Tuning", ICML 2025): answer-style diversification (ASD) of the training
data against superficial forgetting, RegLoRA against essential forgetting.

RegLoRA: after each stage, the key elements of the stage's LoRA update Delta W = B A are the M %
largest |Delta W| entries of each adapted weight; the positions accumulate (union) over stages.
Every later stage trains a fresh LoRA from the merged model with
L = L_llava + lambda * mean over adapted weights of mean |(B A)[key positions]|,
so the new update leaves the earlier tasks' key elements near zero.

ASD rewrites X % of each task's training answers into the four other answer styles (yes/no,
multiple choice, short answer, brief and detailed explanation) with response-format prompts; the
paper does it offline, generating distractors and explanations with an MLLM, and the reference
code trains on the rewritten files (CoIN-ASD's ``train_x20.json``). This method does the same:
with ``asd`` it trains on such a file beside each task's train file. The rewriting itself is not
reimplemented: docs/recent_methods.md says why. ``reglora`` (variants.yaml) is RegLoRA alone on
the plain data, which is how MCITlib runs SEFE on UCIT.

Reference code checked (facts only): jinpeng0528/SEFE and MCITlib SEFE/
key_elements_identification.py (top 2 % of |B A| per weight, union over tasks),
llava/model/language_model/modeling_llama.py (mean |(B A)[keys]| per weight, averaged over the
224 weights) and llava_llama.py (weight 2.5e3).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cl_bench.errors import CLBenchError
from cl_bench.method import Method, MethodContext, Stage
from cl_bench.models.deltas import PEFT_PREFIX, stage_delta
from cl_bench.models.lora import merge_lora
from cl_bench.registry import register_method
from tasks.loaders import Sample, load_samples
from tasks.suite import TaskSpec

KEYS_FILE = "reglora_keys.safetensors"


@dataclass
class SefeOptions:
    """SEFE's options (defaults: the paper's X = 20, M = 2 and the reference's lambda)."""

    reg_weight: float = 2500.0
    """RegLoRA weight lambda of the key-element penalty (reference llava_llama.py: 2.5e3)."""
    key_fraction: float = 0.02
    """M: the share of each adapted weight's update entries that become key elements after each
    task (0.02 = 2 %, reference key_elements_identification.py)."""
    asd: bool = True
    """Train on answer-style-diversified files (ASD); false: RegLoRA alone on the plain data."""
    asd_file: str = "train_x20.json"
    """The ASD file beside each task's train file (CoIN-ASD names it train_x<X>.json; X = 20)."""

    def __post_init__(self) -> None:
        problems = []
        if self.reg_weight < 0:
            problems.append(f"method.reg_weight={self.reg_weight}: must be >= 0")
        if not 0 < self.key_fraction <= 1:
            problems.append(f"method.key_fraction={self.key_fraction}: a share in (0, 1]")
        if self.asd and not self.asd_file.strip():
            problems.append("method.asd_file: name the ASD training file (e.g. train_x20.json)")
        if problems:
            raise CLBenchError("; ".join(problems))


# -- the core terms ------------------------------------------------------------------------------
def key_elements(update: torch.Tensor, fraction: float) -> torch.Tensor:
    """Flat indices (int32, sorted) of the int(fraction * numel) largest |update| entries
    (key_elements_identification.py, top 2 % of |B A|)."""
    k = int(fraction * update.numel())
    top = torch.topk(update.detach().float().abs().flatten(), k).indices
    return torch.sort(top).values.to(torch.int32)


def union_keys(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """The key positions of every task so far (the reference concatenates; a set here)."""
    if old is None:
        return new
    return torch.unique(torch.cat([old.to(new.device), new])).to(torch.int32)


def key_penalty(
    factors: list[tuple[torch.Tensor, torch.Tensor]], keys: list[torch.Tensor], weight: float
) -> torch.Tensor:
    """lambda * mean over weights of mean |(B A)[keys]|, B A unscaled as in the reference."""
    terms = []
    for (A, B), idx in zip(factors, keys, strict=True):
        update = (B @ A).flatten()  # reference modeling_llama.py: lora_B @ lora_A
        terms.append(update.index_select(0, idx).abs().mean())
    return weight * torch.stack(terms).mean()  # reference: sum / 224 weights, * 2.5e3


@register_method(
    "sefe",
    paper="SEFE: Chen et al., ICML 2025 (ASD data + RegLoRA)",
    trains="a fresh LoRA on the language model + the projector each stage on ASD-diversified "
    "data, merged after it; earlier tasks' key update elements regularised",
    growth="key-element positions: M % of each adapted weight (their union is kept)",
)
class Sefe(Method):
    """SEFE: answer-style-diversified data, RegLoRA on the earlier tasks' key elements."""

    Options = SefeOptions

    def __init__(self, options: SefeOptions, context: MethodContext) -> None:
        super().__init__(options, context)
        self.keys: dict[str, torch.Tensor] = {}
        self.regularised: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    # -- data ---------------------------------------------------------------------------------
    def plan(self, tasks: list[TaskSpec]) -> list[Stage]:
        """The stages; every task's ASD file is checked before any training."""
        if self.options.asd:
            missing = [str(p) for p in map(self.asd_path, tasks) if not p.is_file()]
            if missing:
                raise CLBenchError(
                    f"sefe trains on answer-style-diversified (ASD) data and {len(missing)} "
                    f"file(s) are missing: {', '.join(missing)}. ASD rewrites X % of each task's "
                    "training answers into other styles with an MLLM, offline (the paper's "
                    "CoIN-ASD); put such a file beside each task's train file, name another with "
                    "method.asd_file=NAME, or run reglora (RegLoRA alone, method.asd=false)"
                )
        return super().plan(tasks)

    def asd_path(self, task: TaskSpec) -> Path:
        files = self.context.suite.task_files(task, self.context.data_root)
        return files.train.parent / self.options.asd_file

    def training_samples(self, stage: Stage) -> list[Sample]:
        if not self.options.asd:
            return super().training_samples(stage)
        samples = []
        for task in stage.tasks:
            image_root = self.context.suite.task_files(task, self.context.data_root).image_root
            samples += load_samples(self.asd_path(task), image_root)
        return samples

    # -- RegLoRA ------------------------------------------------------------------------------
    def before_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        """A fresh LoRA on the merged model; the earlier key positions go to its device."""
        model = super().before_stage(model, stage)
        self.regularised = []
        for name, idx in self.keys.items():
            module = model.get_submodule(PEFT_PREFIX + name)
            A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
            self.regularised.append((name, A, B, idx.to(A.device)))
        return model

    def extra_losses(self, model: torch.nn.Module, inputs: dict, outputs) -> dict:
        if not self.regularised or self.options.reg_weight == 0:
            return {}
        factors = [(A, B) for _, A, B, _ in self.regularised]
        keys = [idx for *_, idx in self.regularised]
        return {"reglora": key_penalty(factors, keys, self.options.reg_weight)}

    def after_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        """The stage's key elements join the earlier ones; the LoRA is merged."""
        for name, f in stage_delta(model, {}).lora.items():
            new = key_elements(f.B.float() @ f.A.float(), self.options.key_fraction)
            self.keys[name] = union_keys(self.keys.get(name), new).cpu()
        self.regularised = []
        return merge_lora(model)

    def after_evaluation(self, stage: Stage) -> dict:
        return {"key_elements": sum(int(idx.numel()) for idx in self.keys.values())}

    # -- checkpoints -------------------------------------------------------------------------
    def save(self, model: torch.nn.Module, folder: Path) -> None:
        super().save(model, folder)
        if self.keys:
            tensors = {n: idx.contiguous() for n, idx in self.keys.items()}
            save_file(tensors, str(folder / KEYS_FILE))

    def load(self, folder: Path) -> torch.nn.Module:
        model = super().load(folder)
        path = folder / KEYS_FILE
        if not path.is_file():
            raise CLBenchError(f"{path} is missing: the RegLoRA key elements cannot be restored")
        self.keys = load_file(str(path))
        return model

    def state(self) -> dict:
        return {"key_elements": {n: int(idx.numel()) for n, idx in self.keys.items()}}
