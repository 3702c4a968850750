"""Every registered method (variants aside) on the tiny fixtures, cheaply: its cheapest options,
two stages through its hooks (a real Trainer step, or stand-in training), and its evaluation
model's logits through its generation hook. A new method is covered by the parametrized tests
that use this module without being named here; ``CHEAP`` only makes some of them faster."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from method_kit import model_settings, trained_like

from cl_bench.config import RunConfig
from cl_bench.method import Method, MethodContext
from cl_bench.models.batching import collate_batch, prompt_item
from cl_bench.models.llava import load_llava
from cl_bench.models.placement import to_model
from cl_bench.registry import get_method, get_suite, index_methods
from cl_bench.running.training import train_model
from tasks.loaders import load_samples

TASKS = ("ImageNet-R", "ArxivQA")


def cheap_options(name: str, clip: Path) -> dict:
    """The options that make ``name`` cheap on the fixtures (encoders: the tiny CLIP)."""
    return {
        "disco": {"encoder": str(clip)},
        "ewc": {"fisher_batches": 2},
        "hide_llava": {"encoder": str(clip)},
        "keeplora": {"rank": 2},
        "llava_c": {"uir": "none"},
        "modalprompt": {"encoder": str(clip), "prompt_length": 2},
        "model_tailor": {"calibration_samples": 2, "calibration_batch": 2},
        "mr_lora": {"router_samples": 1, "router_epochs": 1.0},
        "same": {"encoder": str(clip), "rank": 4, "components": 4},
        "sefe": {"asd": False},
        "smolora": {"encoder": str(clip), "rank": 8},
    }.get(name, {})


def registered_methods() -> list[str]:
    """Every method registered with ``@register_method`` (variants are option values)."""
    return sorted(name for name, entry in index_methods().items() if entry.base is None)


def build_method(name: str, tiny_llava: Path, ucit_root: Path, clip: Path, run_dir: Path,
                 dtype: str = "fp32", device: str = "cpu") -> Method:
    """``name`` with its cheap options on a freshly loaded tiny LLaVA (LoRA rank 2)."""
    cfg = RunConfig(method=name, suite="ucit", seed=0)
    cfg.lora.rank, cfg.lora.alpha = 2, 4.0
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.global_batch_size = 1, 2, 2
    cfg.train.learning_rate = 1e-2
    spec = get_method(name)
    ctx = MethodContext(cfg, get_suite("ucit"), ucit_root,
                        load_llava(tiny_llava, model_settings(dtype, device)), run_dir)
    return spec.cls(spec.options(cheap_options(name, clip)), ctx)


def two_stages(method: Method, train: bool) -> torch.nn.Module:
    """The method's plan over two UCIT tasks, each stage through ``before_stage``, training and
    ``after_stage``; the final model. Training is stand-in, except with ``train`` at stage 2 (the
    first where the methods' terms on earlier stages apply): one real Trainer step."""
    ctx = method.context
    model = ctx.bundle.model
    for stage in method.plan([ctx.suite.task(name) for name in TASKS]):
        model = method.before_stage(model, stage)
        ctx.note_trainable(model)
        if train and stage.index == 2:
            train_model(model, ctx.bundle, method.training_samples(stage), ctx.config.train,
                        ctx.run_dir / "trainer" / str(stage.index), ctx.config.seed,
                        method.extra_losses, functools.partial(method.before_train_batch, model))
        else:
            trained_like(model, stage.index)
        model = method.after_stage(model, stage)
    return model


def sample_prompts(method: Method, count: int = 2) -> list:
    folder = method.context.data_root / "UCIT"
    return load_samples(folder / TASKS[0] / "test.json", folder / "datasets")[:count]


@torch.no_grad()
def eval_logits(method: Method, model: torch.nn.Module, samples: list) -> torch.Tensor:
    """The logits of the method's evaluation model on ``samples`` (one left-padded batch, after
    the method's generation hook), float32 on the CPU."""
    bundle = method.context.bundle
    evaluated = method.eval_model(model)
    items = [prompt_item(bundle, s.question, s.image) for s in samples]
    method.before_generate(evaluated, [(s.question, item["image"]) for s, item
                                       in zip(samples, items, strict=True)], TASKS[0])
    return model_logits(evaluated, bundle, items)


@torch.no_grad()
def model_logits(model: torch.nn.Module, bundle, items: list[dict]) -> torch.Tensor:
    """A model's logits on prompt items (``prompt_item``), float32 on the CPU."""
    model.eval()
    batch = to_model(collate_batch(items, bundle, left_pad=True), model)
    return model(**batch).logits.float().cpu()
