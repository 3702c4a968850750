"""ModalPrompt's task prompts: prototypes, dual-modality guidance, selection and alignment.

Each task t owns a prompt p_t (L token embeddings) and a projection T_t (Linear-SiLU-Linear,
language-model width -> CLIP feature width); its prototype is the mean of T_t(p_t) over the
prompt's tokens. A sample's guidance towards task t is lambda * cos(image feature, proto_t) +
(1 - lambda) * cos(text feature, proto_t) on CLIP features (text alone without an image). Checked
against the official ``llava/model/llava_arch.py`` (``prepare_inputs_labels_for_multimodal``:
``proto_tokens``, ``guide_coef``, the training and inference branches, ``image_cos_sim_loss``,
``text_cos_sim_loss``) and ``language_model/ModalPrompt.py`` (``prompt_transform``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.functional import cosine_similarity

from cl_bench.errors import CLBenchError
from cl_bench.models.prompting import RowPrompts


@dataclass
class BatchFeatures:
    """A batch's CLIP features: image (zeros where none), text, and which rows have an image."""

    image: torch.Tensor
    text: torch.Tensor
    has_image: torch.Tensor


def prototype(transform: torch.nn.Module, prompt: torch.Tensor) -> torch.Tensor:
    """A task's prototype: the mean over its prompt's tokens of T_t(p_t) (``proto_tokens``)."""
    return transform(prompt).mean(0)


def guidance(features: BatchFeatures, prototypes: torch.Tensor,
             image_weight: float) -> torch.Tensor:
    """Each row's similarity to each task's prototype (rows x tasks), ``guide_coef``."""
    protos = prototypes.unsqueeze(0)
    text = cosine_similarity(features.text.unsqueeze(1), protos, dim=-1)
    image = cosine_similarity(features.image.unsqueeze(1), protos, dim=-1)
    both = image_weight * image + (1 - image_weight) * text  # ModalPrompt: lam*img + (1-lam)*txt
    return torch.where(features.has_image.unsqueeze(1), both, text)


def nearest_last(guide: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` most similar tasks per row, least similar first, so the best sits next to the
    text (the references' ``flip(topk(...))``)."""
    return guide.topk(n, dim=1).indices.flip(1)


def alignment_loss(features: BatchFeatures, proto: torch.Tensor) -> torch.Tensor:
    """(1 - mean cos(image, proto_t)) + (1 - mean cos(text, proto_t)): the current task's
    prototype pulled to the batch's features (``image_cos_sim_loss + text_cos_sim_loss``)."""
    target = proto.unsqueeze(0)
    text = 1 - cosine_similarity(features.text, target, dim=-1).mean()
    rows = features.has_image
    if not bool(rows.any()):
        return text
    return text + 1 - cosine_similarity(features.image[rows], target, dim=-1).mean()


class TaskPrompts(torch.nn.Module):
    """Every learned task's prompt and projection; the last one trains, the others are frozen.

    Called with the batch's rows (``cl_bench.models.prompting``) after ``set_features``: in
    training mode the top_k - 1 previous prompts nearest the sample plus the current task's
    prompt (last); in evaluation mode the top_k prompts nearest the sample among all tasks.
    """

    def __init__(self, hidden: int, feature_dim: int, top_k: int, image_weight: float) -> None:
        super().__init__()
        self.hidden, self.feature_dim = hidden, feature_dim
        self.top_k, self.image_weight = top_k, image_weight
        self.prompts = torch.nn.ParameterList()
        self.transforms = torch.nn.ModuleList()
        self.tasks: list[str] = []
        self.features: BatchFeatures | None = None
        self.alignment: torch.Tensor | None = None
        self.chosen: torch.Tensor | None = None

    def add_task(self, task: str, prompt: torch.Tensor) -> None:
        """A new task's prompt (L x hidden, fp32) and projection; every earlier one frozen."""
        for p in self.parameters():
            p.requires_grad_(False)
        self.prompts.append(torch.nn.Parameter(prompt.float()))
        self.transforms.append(torch.nn.Sequential(
            torch.nn.Linear(self.hidden, self.hidden), torch.nn.SiLU(),
            torch.nn.Linear(self.hidden, self.feature_dim),
        ).to(prompt.device))
        self.tasks.append(task)

    def set_features(self, features: BatchFeatures) -> None:
        device = self.prompts[0].device
        self.features = BatchFeatures(features.image.to(device).float(),
                                      features.text.to(device).float(),
                                      features.has_image.to(device))

    def prototypes(self) -> torch.Tensor:
        return torch.stack([prototype(t, p) for t, p in zip(self.transforms, self.prompts,
                                                             strict=True)])

    def choose(self, features: BatchFeatures) -> torch.Tensor:
        """Task indices of each row's prompts (rows x n), in insertion order."""
        with torch.no_grad():
            protos = self.prototypes()
        if not self.training:
            n = min(self.top_k, len(self.prompts))
            return nearest_last(guidance(features, protos, self.image_weight), n)
        current = len(self.prompts) - 1
        previous = nearest_last(guidance(features, protos[:current], self.image_weight),
                                min(self.top_k - 1, current))
        own = torch.full((previous.shape[0], 1), current, device=previous.device)
        return torch.cat([previous, own], dim=1)

    def forward(self, rows: int) -> RowPrompts:
        f = self.features
        if f is None or f.text.shape[0] != rows:
            raise CLBenchError("ModalPrompt features are not set for this batch: the method's "
                               "before_train_batch / before_generate hook must see every batch")
        self.chosen = self.choose(f)
        if self.training:
            current = len(self.prompts) - 1
            self.alignment = alignment_loss(
                f, prototype(self.transforms[current], self.prompts[current]))
        prompts = torch.stack(list(self.prompts))
        return RowPrompts(prompts[self.chosen].flatten(1, 2))

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors to store: each task's prompt and projection."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
