"""ModalPrompt: per-task prompts, chosen at inference by image and text prototype similarity.

ModalPrompt (Zeng et al., EMNLP 2025; arXiv 2410.05849), as its official code runs it: the LLaVA
stays frozen and no LoRA is trained. Each stage adds a task prompt (``prompt_length`` token
embeddings, initialised from random vocabulary embeddings) and a projection to the CLIP feature
space whose mean over the prompt is the task's prototype. Training inserts, right after BOS, the
top_k - 1 earlier prompts nearest the sample plus the current one (next to the text) and adds the
alignment loss pulling the current prototype to the batch's CLIP image and text features.
Inference inserts the top_k prompts whose prototypes are nearest the sample's CLIP image and
question features (lambda * image + (1 - lambda) * text cosine), without a task id. Features come
from the same encoder plumbing as HiDe-LLaVA (a local CLIP; the micro world's tiny CLIP by
default). The selection is per sample, so a batch answers as its samples one at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cl_bench.errors import CLBenchError
from cl_bench.method import Method, MethodContext, Stage
from cl_bench.models.encoders import Encoder, suite_encoder
from cl_bench.models.lora import set_projector_trainable
from cl_bench.models.prompting import PromptInsertion, attach_prompts, vocabulary_embeddings
from cl_bench.models.sharing import shallow_copy
from cl_bench.registry import register_method
from methods.modalprompt.options import ModalPromptOptions
from methods.modalprompt.prompts import BatchFeatures, TaskPrompts

Prompt = tuple[str, Image.Image | None]
PROMPTS_FILE = "modalprompt.safetensors"
_PROBE_IMAGE = Image.new("RGB", (8, 8))


@register_method(
    "modalprompt",
    paper="ModalPrompt (Zeng et al., EMNLP 2025); M-Prompt in LLaVA-c Tables 2-3, 7-8",
    trains="a prompt and a prototype projection per task (the LLaVA frozen, no LoRA)",
    growth="one prompt (prompt_length x hidden) + one projection MLP (hidden -> hidden -> CLIP)",
    routes=True,
)
class ModalPrompt(Method):
    """ModalPrompt: per-task prompts selected by dual-modality prototypes, no LoRA."""

    Options = ModalPromptOptions

    def __init__(self, options: ModalPromptOptions, context: MethodContext) -> None:
        super().__init__(options, context)
        self.encoder: Encoder = suite_encoder(options.encoder, context, options.text_feature,
                                               "modalprompt")
        self.feature_dim = self._feature_dim()
        self.prompts: TaskPrompts | None = None
        self.insertion: PromptInsertion | None = None
        self.selections: dict[str, list[int]] = {}

    def _feature_dim(self) -> int:
        """One prototype is compared with both features: their widths must agree."""
        image = self.encoder.image_features([_PROBE_IMAGE]).shape[-1]
        text = self.encoder.text_features(["a"]).shape[-1]
        if image != text:
            raise CLBenchError(
                f"modalprompt compares each task's prototype with the image and the text "
                f"feature, but {self.encoder.description} gives {image} image and {text} text "
                "dims: use method.text_feature=projected, or a CLIP whose text width equals its "
                "projection width (clip-vit-large-patch14-336: both 768)"
            )
        return image

    # -- training ----------------------------------------------------------------------------
    def before_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        """Freeze the model (the projector too, unless asked), add the stage's prompt."""
        model.requires_grad_(False)
        set_projector_trainable(model, self.options.train_projector)
        if self.prompts is None:
            self.prompts = TaskPrompts(model.config.text_config.hidden_size, self.feature_dim,
                                       self.options.top_k, self.options.image_weight)
        prompt = vocabulary_embeddings(model, (self.options.prompt_length,))
        self.prompts.add_task(stage.name, prompt)
        self.insertion = attach_prompts(model, self.prompts)
        return model

    def before_train_batch(self, model: torch.nn.Module, prompts: Sequence[Prompt]) -> None:
        self.prompts.set_features(self.features(prompts))

    def extra_losses(self, model: torch.nn.Module, inputs: dict, outputs) -> dict:
        return {"modalprompt_alignment": self.prompts.alignment}

    def after_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        self.insertion.remove()
        self.insertion = None
        return model

    def features(self, prompts: Sequence[Prompt]) -> BatchFeatures:
        """CLIP image features (zeros without an image) and question features of a batch."""
        has_image = torch.tensor([image is not None for _, image in prompts])
        text = self.encoder.text_features([question for question, _ in prompts]).cpu()
        image = torch.zeros_like(text)
        images = [image for _, image in prompts if image is not None]
        if images:
            image[has_image] = self.encoder.image_features(images).cpu()
        return BatchFeatures(image, text, has_image)

    # -- evaluation --------------------------------------------------------------------------
    def eval_model(self, model: torch.nn.Module) -> torch.nn.Module:
        self.selections = {}
        evaluated = shallow_copy(model)
        attach_prompts(evaluated, self.prompts)
        return evaluated

    def before_generate(self, model: torch.nn.Module, prompts: Sequence[Prompt],
                        label: str) -> None:
        """Set the batch's features; count each sample's nearest task prompt."""
        self.prompts.set_features(self.features(prompts))
        self.prompts.eval()
        counts = self.selections.setdefault(label, [0] * len(self.prompts.tasks))
        for task in self.prompts.choose(self.prompts.features)[:, -1].tolist():
            counts[task] += 1

    def after_evaluation(self, stage: Stage) -> dict:
        """Per evaluated set: how often each task's prompt was the nearest, and how often the
        set's own task's (its selection accuracy, %)."""
        tasks = self.prompts.tasks
        accuracy = {
            label: 100.0 * counts[tasks.index(label)] / sum(counts)
            for label, counts in self.selections.items() if label in tasks and sum(counts)
        }
        return {"tasks": tasks, "selections": self.selections, "selection_accuracy": accuracy}

    # -- checkpoints -------------------------------------------------------------------------
    def save(self, model: torch.nn.Module, folder: Path) -> None:
        super().save(model, folder)
        save_file(self.prompts.state(), str(folder / PROMPTS_FILE),
                  {"tasks": "\n".join(self.prompts.tasks)})

    def load(self, folder: Path) -> torch.nn.Module:
        model = super().load(folder)
        path = folder / PROMPTS_FILE
        if not path.is_file():
            raise CLBenchError(f"{path} is missing: a ModalPrompt checkpoint keeps its task "
                               "prompts there")
        with safe_open(str(path), "pt") as f:
            tasks = (f.metadata() or {}).get("tasks", "").split("\n")
        tensors = load_file(str(path))
        device = model.get_input_embeddings().weight.device
        self.prompts = TaskPrompts(model.config.text_config.hidden_size, self.feature_dim,
                                   self.options.top_k, self.options.image_weight)
        for i, task in enumerate(tasks):
            self.prompts.add_task(task, tensors[f"prompts.{i}"].to(device))
        self.prompts.load_state_dict(tensors)
        return model
