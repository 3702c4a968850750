"""Run configuration: one dataclass tree behind the CLI, YAML files and Python keywords.

Precedence, lowest first: dataclass defaults < suite defaults < config file < ``--set``.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from cl_bench.errors import CLBenchError
from tasks.loaders import read_text

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelConfig:
    """The starting model and how it runs (``--model PATH`` sets ``model.path``).

    device: auto | cpu | cuda | cuda:N (``cuda`` is cuda:LOCAL_RANK under a launcher).
    dtype: auto (bfloat16 on CUDA, float32 on the CPU) | bf16 | fp16 | fp32, of the frozen
    weights; what trains or accumulates stays float32. attn_implementation: auto
    (flash_attention_2 where installed on CUDA, else sdpa) | sdpa | eager | flash_attention_2.
    conversation and image_aspect_ratio: the prompt template and image preprocessing, among
    those of the model's family (``cl_bench.models.backbones``, found by its config.json).
    """

    path: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: str = "auto"
    conversation: str = "vicuna_v1"
    image_aspect_ratio: str = "pad"


@dataclass
class TrainConfig:
    """Optimisation settings; names map onto transformers.TrainingArguments.

    batch_size is per device; global_batch_size (None: batch_size x world size) sets the
    gradient accumulation. projector_lr (None: learning_rate) is the projector's own rate.
    save_steps > 0 writes a resumable Trainer checkpoint every that many optimizer steps.
    """

    learning_rate: float = 2e-4
    projector_lr: float | None = None
    epochs: float = 1.0
    batch_size: int = 16
    global_batch_size: int | None = None
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_steps: int = -1
    max_length: int = 2048
    gradient_checkpointing: bool = False
    dataloader_workers: int = 0
    save_steps: int = 0
    deepspeed: str | None = None
    limit: int | None = None


@dataclass
class LoraSettings:
    """LoRA on the language model's linear layers (PEFT)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(LLAMA_LINEAR))
    train_projector: bool = True


@dataclass
class EvalConfig:
    """Batched greedy generation and scoring."""

    batch_size: int = 32
    max_new_tokens: int = 128
    limit: int | None = None
    rule: str = "exact"


@dataclass
class RunConfig:
    """Everything a run needs; written fully resolved to ``config.yaml`` in the run folder."""

    method: str = "finetune"
    suite: str = "ucit-micro"
    order: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data_root: str | None = None
    out: str | None = None
    seed: int = 0
    quick: bool = False
    general: list[str] | None = None
    probes: bool = True
    report_to: list[str] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    eval: EvalConfig = field(default_factory=EvalConfig)
    method_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model is None or isinstance(self.model, str | Path):  # RunConfig(model=PATH)
            self.model = ModelConfig(path=None if self.model is None else str(self.model))


QUICK = {"train.limit": 48, "train.max_steps": 6, "eval.limit": 12, "eval.max_new_tokens": 12,
         "train.dataloader_workers": 0}


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict, source: str = "config") -> RunConfig:
    """A RunConfig from a nested dict; unknown keys are errors naming ``source``."""
    cfg = RunConfig()
    for key, value in _flatten(data):
        set_key(cfg, key, value, source)
    return cfg


def _flatten(data: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and key != "method_options":
            items.extend(_flatten(value, dotted + "."))
        else:
            items.append((dotted, value))
    return items


def set_key(cfg: RunConfig, dotted: str, value: Any, source: str = "--set") -> None:
    """Set ``a.b`` on the config, converting the value to the field's type.

    ``method.X`` (or ``method_options.X``) sets a method option, checked later against the
    method's own options.
    """
    head, _, rest = dotted.partition(".")
    if dotted == "model" and not isinstance(value, dict):
        dotted = "model.path"  # ``model: PATH`` (and --model PATH) name the model folder
    if head in ("method", "method_options") and rest:
        cfg.method_options[rest] = yaml.safe_load(value) if isinstance(value, str) else value
        return
    if head == "method_options" and isinstance(value, dict):
        cfg.method_options.update(value)
        return
    target: Any = cfg
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        fields = {f.name for f in dataclasses.fields(target)}
        if part not in fields:
            where = ".".join(parts[:i])
            known = [f"{where}.{f}" if where else f for f in fields]
            close = difflib.get_close_matches(dotted, known, n=2, cutoff=0.5)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            raise CLBenchError(f"{source}: unknown config key {dotted!r}.{hint}")
        if i == len(parts) - 1:
            hint_type = get_type_hints(type(target))[part]
            setattr(target, part, convert_value(value, hint_type, dotted, source))
        else:
            target = getattr(target, part)
            if not dataclasses.is_dataclass(target):
                raise CLBenchError(f"{source}: {'.'.join(parts[: i + 1])} takes no sub-keys")


def convert_value(value: Any, hint: Any, key: str, source: str) -> Any:
    """``value`` (a string from the command line, or a YAML scalar) as type ``hint``."""
    args = [a for a in get_args(hint) if a is not type(None)]
    optional = type(None) in get_args(hint)
    base = args[0] if optional and len(args) == 1 else hint
    if isinstance(value, str):
        if value.strip() in ("", "None", "none"):
            value = value if base is str and not optional else None  # "none" is a str value
        else:
            value = yaml.safe_load(value)
    if value is None:
        if optional or hint is Any:
            return None
        raise CLBenchError(f"{source}: {key} needs a value of type {_type_name(hint)}")
    try:
        if get_origin(base) is list:
            return [str(v) for v in value] if isinstance(value, list) else str(value).split(",")
        if base is bool:
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
        if base in (int, float, str):
            if base is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return base(value)
        return value
    except (TypeError, ValueError):
        raise CLBenchError(
            f"{source}: {key}={value!r} is not a valid {_type_name(hint)}"
        ) from None


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def load_yaml(path: Path) -> dict:
    """A config file's mapping, with the file named on errors."""
    if not path.is_file():
        raise CLBenchError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(read_text(path)) or {}  # read_text: encoding errors name the byte
    except yaml.YAMLError as err:
        raise CLBenchError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(data, dict):
        raise CLBenchError(f"{path}: expected a mapping of config keys")
    return data


def method_recipe(method: str) -> dict[str, Any]:
    """The config defaults a method declares from its paper (``@register_method(recipe=...)``),
    read from source without importing the method."""
    from cl_bench.registry import index_methods, unknown_name_error

    entries = index_methods()
    if method not in entries:
        raise unknown_name_error("method", method, list(entries))
    return dict(entries[method].capabilities.recipe)


def resolve(
    config_file: Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    defaults_for: Callable[[str], dict[str, Any]] = lambda suite: {},
    recipe_for: Callable[[str], dict[str, Any]] = method_recipe,
    **fields: Any,
) -> RunConfig:
    """Build the run config by the documented precedence; keyword fields are top-level keys.

    Lowest first: dataclass defaults < the method's recipe (``recipe_for(method)``) < the
    suite's defaults (``defaults_for(suite)``) < the config file < keyword fields < ``--quick``
    < ``--set``. A suite sets what its benchmark fixes (batch, learning rates, lengths); a
    method what its paper fixes for itself (e.g. its LoRA rank), unless the suite overrides it.
    """
    file_items = _flatten(load_yaml(config_file)) if config_file is not None else []
    set_items = [item.partition("=")[::2] for item in overrides]
    named = {"suite": RunConfig().suite, "method": RunConfig().method}
    for key, value in [*file_items, *fields.items(), *set_items]:
        if key.strip() in named and value is not None:
            named[key.strip()] = str(value).strip()
    cfg = RunConfig()
    for key, value in recipe_for(named["method"]).items():
        set_key(cfg, key, value, f"method {named['method']} recipe")
    for key, value in defaults_for(named["suite"]).items():
        set_key(cfg, key, value, f"suite {named['suite']} defaults")
    for key, value in file_items:
        set_key(cfg, key, value, str(config_file))
    for key, value in fields.items():
        if value is not None:
            set_key(cfg, key, value, "arguments")
    if cfg.quick:
        for key, value in QUICK.items():
            set_key(cfg, key, value, "--quick")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise CLBenchError(f"--set {item!r}: expected key=value")
        set_key(cfg, key.strip(), value, "--set")
    return cfg
