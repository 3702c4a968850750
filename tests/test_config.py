from pathlib import Path

import pytest

from cl_bench.config import RunConfig, from_dict, resolve, to_dict
from cl_bench.errors import CLBenchError


def test_precedence_defaults_suite_file_cli(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("train:\n  learning_rate: 0.01\n  epochs: 3\nseed: 5\n")
    cfg = resolve(
        file,
        ["train.epochs=4", "method.alpha=0.3"],
        lambda suite: {"train.learning_rate": 0.5, "train.batch_size": 7},
    )
    assert cfg.train.batch_size == 7  # suite default
    assert cfg.train.learning_rate == 0.01  # file beats suite
    assert cfg.train.epochs == 4.0  # --set beats file
    assert cfg.seed == 5
    assert cfg.method_options == {"alpha": 0.3}


def test_quick_is_recorded_and_shrinks() -> None:
    cfg = resolve(quick=True)
    assert cfg.quick and cfg.train.limit is not None and cfg.eval.limit is not None


def test_round_trip() -> None:
    cfg = resolve(overrides=["lora.targets=q_proj,v_proj", "eval.limit=None"])
    assert from_dict(to_dict(cfg)) == cfg
    assert cfg.lora.targets == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "item, message",
    [
        ("train.learnig_rate=1", "Did you mean train.learning_rate"),
        ("train.batch_size=1.5", "not a valid int"),
        ("quick=maybe", "not a valid bool"),
        ("nonsense", "expected key=value"),
        ("seed.x=1", "takes no sub-keys"),
    ],
)
def test_bad_overrides(item: str, message: str) -> None:
    with pytest.raises(CLBenchError, match=message):
        resolve(overrides=[item])


def test_config_file_errors_name_the_file(tmp_path: Path) -> None:
    file = tmp_path / "bad.yaml"
    file.write_text("train:\n  nope: 1\n")
    with pytest.raises(CLBenchError, match="bad.yaml: unknown config key 'train.nope'"):
        resolve(file)


def test_suite_named_in_file_selects_its_defaults(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("suite: other\n")
    seen = []
    resolve(file, defaults_for=lambda s: seen.append(s) or {})
    assert seen == ["other"]
    assert RunConfig().suite == "ucit-micro"


def test_method_recipe_sits_below_the_suite_and_the_user() -> None:
    from cl_bench.registry import get_suite

    def suite(name):
        return get_suite(name).defaults

    assert resolve(suite="ucit", method="llava_c", defaults_for=suite).lora.rank == 128
    assert resolve(suite="ucit", method="hide_llava", defaults_for=suite).lora.rank == 8
    assert resolve(suite="ucit", method="finetune", defaults_for=suite).lora.rank == 8
    micro = resolve(suite="ucit-micro", method="llava_c", defaults_for=suite)
    assert micro.lora.rank == 16  # the CPU world's own setting wins over the paper's
    cfg = resolve(overrides=["method=llava_c", "lora.rank=4"], suite="ucit", defaults_for=suite)
    assert cfg.method == "llava_c" and cfg.lora.rank == 4
    ucit = resolve(suite="ucit", method="llava_c", defaults_for=suite)
    assert (ucit.train.global_batch_size, ucit.train.projector_lr) == (24, 2e-5)
    assert (ucit.model.conversation, ucit.model.image_aspect_ratio) == ("vicuna_v1", "pad")
    assert resolve(suite="llavac-ft", defaults_for=suite).train.global_batch_size == 128


def test_the_model_key_names_the_folder_and_holds_the_settings(tmp_path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("model: /models/llava\n")
    assert resolve(file).model.path == "/models/llava"
    file.write_text("model: {path: /m, dtype: bf16, device: cuda:1}\n")
    cfg = resolve(file, ["model.attn_implementation=sdpa"])
    assert (cfg.model.path, cfg.model.dtype, cfg.model.device) == ("/m", "bf16", "cuda:1")
    assert RunConfig(model="/x").model.path == "/x"
