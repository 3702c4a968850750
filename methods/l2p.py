"""L2P: a pool of prompts with learnable keys, chosen per sample by a frozen query feature.

Learning to Prompt (Wang et al., CVPR 2022), adapted to a LLaVA the way MLLM references do
(FederatedCL's ``models/llava/l2p_model.py``): the whole model stays frozen (language model,
projector, vision tower); the pool's M prompts of L_p token embeddings and their M keys are the
only trained parameters. The query q(x) is the frozen model's own [CLS] feature of the input
image (eq. 3's ``q(x) = f(x)[0,:]``: LLaVA's CLIP vision tower, pooled CLS output); each sample's
N prompts with the nearest keys (cosine) enter the language model's input right after BOS (as in
L2P's ViT the prompts follow the [class] token; ``cl_bench.models.prompting``). A sample without
an image has no query: it gets no prompt (masked prompt positions), i.e. the frozen model.
Training adds L2P's surrogate loss pulling the selected keys to the queries (eq. 5). The pool is
shared by all stages and never reset; nothing is merged, so the language model is bit-for-bit
the starting one after every stage.

Checked against the paper (eq. 1-3, 5; section 5.2 for M, N, L_p and lambda) and
JH-LEE-KR/l2p-pytorch ``prompt.py`` (uniform(-1, 1) keys, per-row top-N by cosine). Not
implemented: eq. 4's optional frequency-penalised selection (the paper uses it for 5-datasets
only) and l2p-pytorch's batch-wise majority prompt (it would make an answer depend on its batch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cl_bench.errors import CLBenchError
from cl_bench.method import Method, MethodContext, Stage
from cl_bench.models.encoders import LlavaEncoder
from cl_bench.models.prompting import (
    PromptInsertion,
    RowPrompts,
    attach_prompts,
    vocabulary_embeddings,
)
from cl_bench.models.sharing import shallow_copy
from cl_bench.registry import register_method

Prompt = tuple[str, Image.Image | None]
POOL_FILE = "l2p_pool.safetensors"


@dataclass
class L2POptions:
    """L2P (defaults: the paper's section 5.2, Split CIFAR-100 / CORe50 setting)."""

    pool_size: int = 10
    """M, the prompts in the pool (L2P sec. 5.2: 10)."""
    top_n: int = 5
    """N, the prompts selected per sample by query-key cosine (L2P sec. 5.2: 5)."""
    prompt_length: int = 5
    """L_p, tokens per prompt (L2P sec. 5.2: 5)."""
    key_weight: float = 0.5
    """lambda of the surrogate key loss, eq. 5 (the paper's 0.5; l2p-pytorch uses 0.1)."""

    def __post_init__(self) -> None:
        check_options(self)


def check_options(o: L2POptions) -> None:
    """Bad values are errors when the options are read, before any run folder or training."""
    problems = []
    if o.top_n < 1 or o.pool_size < o.top_n:
        problems.append(f"method.pool_size={o.pool_size}, method.top_n={o.top_n}: need "
                        "1 <= top_n <= pool_size (N prompts chosen from a pool of M)")
    if o.prompt_length < 1:
        problems.append(f"method.prompt_length={o.prompt_length}: must be >= 1")
    if o.key_weight < 0:
        problems.append(f"method.key_weight={o.key_weight}: must be >= 0")
    if problems:
        raise CLBenchError("; ".join(problems))


# -- L2P eq. 3 and 5 ------------------------------------------------------------------------------
def select_prompts(queries: torch.Tensor, keys: torch.Tensor,
                   top_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the ``top_n`` keys nearest the query and their cosine similarities (B x N),
    nearest first."""
    sims = torch.nn.functional.cosine_similarity(  # L2P eq. 3: gamma = cosine distance
        queries.float().unsqueeze(1), keys.float().unsqueeze(0), dim=-1)
    best, index = sims.topk(top_n, dim=1)  # L2P eq. 3: argmin of the summed distances
    return index, best


def key_loss(selected_sims: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Mean over rows with a query of sum_i gamma(q(x), k_si), gamma = 1 - cos (L2P eq. 5)."""
    distance = (1 - selected_sims).sum(1)  # L2P eq. 5, second term (before lambda)
    if not bool(present.any()):
        return distance.sum() * 0
    return distance[present].mean()


class PromptPool(torch.nn.Module):
    """L2P's prompt pool (eq. 1) with a key per prompt; ``set_queries`` before each forward."""

    def __init__(self, prompts: torch.Tensor, keys: torch.Tensor, top_n: int) -> None:
        super().__init__()
        self.prompts = torch.nn.Parameter(prompts.float())  # M x L_p x D
        self.keys = torch.nn.Parameter(keys.float())  # M x D_k
        self.top_n = top_n
        self.queries: torch.Tensor | None = None
        self.present: torch.Tensor | None = None
        self.selected: torch.Tensor | None = None
        self.distance: torch.Tensor | None = None

    def set_queries(self, queries: torch.Tensor, present: torch.Tensor) -> None:
        """The batch's query features (rows x D_k) and which rows have one."""
        self.queries = queries.to(self.keys)
        self.present = present.to(self.keys.device)

    def forward(self, rows: int) -> RowPrompts:
        if self.queries is None or self.queries.shape[0] != rows:
            raise CLBenchError("L2P queries are not set for this batch: the method's "
                               "before_train_batch / before_generate hook must see every batch")
        index, sims = select_prompts(self.queries, self.keys, self.top_n)
        self.selected = index
        self.distance = key_loss(sims, self.present)
        embeds = self.prompts[index].flatten(1, 2)  # L2P eq. 2: [P_s1; ...; P_sN]
        return RowPrompts(embeds, self.present)


@register_method(
    "l2p",
    paper="L2P (Wang et al., CVPR 2022), eq. 1-3, 5; as MLLM baseline in HiDe-LLaVA and LLaVA-c",
    trains="a shared pool of prompts and keys only (the whole LLaVA frozen)",
    growth="none (a fixed pool of M prompts)",
    routes=True,
)
class L2P(Method):
    """L2P: per-sample prompts from a key-matched pool, prepended after BOS; the LLaVA frozen."""

    Options = L2POptions

    def __init__(self, options: L2POptions, context: MethodContext) -> None:
        super().__init__(options, context)
        self.pool: PromptPool | None = None
        self.insertion: PromptInsertion | None = None
        self.usage: dict[str, list[int]] = {}

    # -- training ----------------------------------------------------------------------------
    def before_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        """Freeze the whole model and insert the (persistent) pool's prompts."""
        model.requires_grad_(False)
        if self.pool is None:
            self.pool = self._new_pool(model)
        self.insertion = attach_prompts(model, self.pool)
        return model

    def _new_pool(self, model: torch.nn.Module) -> PromptPool:
        o = self.options
        prompts = vocabulary_embeddings(model, (o.pool_size, o.prompt_length))
        query_dim = model.config.vision_config.hidden_size
        keys = torch.empty(o.pool_size, query_dim).uniform_(-1, 1)  # l2p-pytorch prompt.py init
        return PromptPool(prompts, keys, o.top_n).to(prompts.device)

    def before_train_batch(self, model: torch.nn.Module, prompts: Sequence[Prompt]) -> None:
        self._set_queries(model, prompts)

    def extra_losses(self, model: torch.nn.Module, inputs: dict, outputs) -> dict:
        return {"l2p_keys": self.options.key_weight * self.pool.distance}  # L2P eq. 5

    def after_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        self.insertion.remove()
        self.insertion = None
        return model

    # -- evaluation --------------------------------------------------------------------------
    def eval_model(self, model: torch.nn.Module) -> torch.nn.Module:
        self.usage = {}
        evaluated = shallow_copy(model)
        attach_prompts(evaluated, self.pool)
        return evaluated

    def before_generate(self, model: torch.nn.Module, prompts: Sequence[Prompt],
                        label: str) -> None:
        self._set_queries(model, prompts)
        index, _ = select_prompts(self.pool.queries, self.pool.keys, self.options.top_n)
        counts = self.usage.setdefault(label, [0] * self.options.pool_size)
        for row in index[self.pool.present].tolist():
            for i in row:
                counts[i] += 1

    def _set_queries(self, model: torch.nn.Module, prompts: Sequence[Prompt]) -> None:
        """q(x): the frozen vision tower's pooled [CLS] feature of each row's image."""
        present = torch.tensor([image is not None for _, image in prompts])
        queries = torch.zeros(len(prompts), self.pool.keys.shape[1])
        images = [image for _, image in prompts if image is not None]
        if images:
            bundle = dataclasses.replace(self.context.bundle, model=model)
            queries[present] = LlavaEncoder(bundle).image_features(images).cpu()
        self.pool.set_queries(queries, present)

    def after_evaluation(self, stage: Stage) -> dict:
        """How often each pool prompt was selected per evaluated set (L2P Figure 3)."""
        return {"prompt_usage": self.usage} if self.usage else {}

    # -- checkpoints -------------------------------------------------------------------------
    def save(self, model: torch.nn.Module, folder: Path) -> None:
        super().save(model, folder)
        save_file({"prompts": self.pool.prompts.detach().cpu().contiguous(),
                   "keys": self.pool.keys.detach().cpu().contiguous()}, str(folder / POOL_FILE))

    def load(self, folder: Path) -> torch.nn.Module:
        model = super().load(folder)
        path = folder / POOL_FILE
        if not path.is_file():
            raise CLBenchError(f"{path} is missing: an L2P checkpoint keeps its prompt pool there")
        tensors = load_file(str(path))
        o = self.options
        if tuple(tensors["prompts"].shape[:2]) != (o.pool_size, o.prompt_length):
            raise CLBenchError(f"{path}: a pool of {tuple(tensors['prompts'].shape[:2])} "
                               f"(prompts, length), the run's options give "
                               f"({o.pool_size}, {o.prompt_length})")
        device = model.get_input_embeddings().weight.device
        self.pool = PromptPool(tensors["prompts"], tensors["keys"], o.top_n).to(device)
        return model
