"""Precision: what trains is float32, and no stage's update is lost to bfloat16 rounding.

The tiny model is loaded in bfloat16 on the CPU (bfloat16 arithmetic is real there), so these
tests fail where a path merges a small update into low-precision weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from method_kit import model_settings

from cl_bench.config import RunConfig
from cl_bench.errors import CLBenchError
from cl_bench.method import MethodContext, Stage
from cl_bench.models.deltas import LoraFactors, StageDelta
from cl_bench.models.llava import load_llava
from cl_bench.models.lora import language_model_linears, projector
from cl_bench.models.updates import UpdatedLinear, add_update, apply_delta
from cl_bench.registry import get_method, get_suite

RELATIVE = 1e-4  # |dW| / |W|, below where LLaVA-c's SAC and ModelMix at alpha 0.2 land


def method_on(name: str, model_dir: Path, root: Path, run_dir: Path, dtype: str, **options):
    cfg = RunConfig(method=name, suite="ucit")
    cfg.lora.rank, cfg.lora.alpha = 4, 8.0
    spec = get_method(name)
    ctx = MethodContext(cfg, get_suite("ucit"), root, load_llava(model_dir, model_settings(dtype)),
                        run_dir)
    return spec.cls(spec.options(options), ctx)


def stage(index: int = 1) -> Stage:
    return Stage(index, (get_suite("ucit").task("ImageNet-R"),))


def small_lora(model: torch.nn.Module, seed: int,
               adapter: str = "default") -> dict[str, torch.Tensor]:
    """Set each LoRA so that scaling * B @ A is RELATIVE times its weight's norm; returns the
    updates by module name (PEFT prefix off)."""
    gen = torch.Generator().manual_seed(seed)
    expected = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if not hasattr(module, "lora_A") or adapter not in module.lora_A:
                continue
            A, B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            A.copy_(torch.randn(A.shape, generator=gen))
            B.copy_(torch.randn(B.shape, generator=gen))
            update = module.scaling[adapter] * (B @ A)
            scale = RELATIVE * module.base_layer.weight.float().norm() / update.norm()
            B.mul_(scale)
            expected[name.removeprefix("base_model.model.")] = update * scale
    return expected


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().float() - want).norm() / want.norm())


def applied_update(layer: torch.nn.Module, start: torch.Tensor) -> torch.Tensor:
    """What a layer applies beyond its starting weight: merged into it, and beside it."""
    applied = layer.weight.detach().float() - start.float()
    return applied + layer.delta() if isinstance(layer, UpdatedLinear) else applied


def output_shift(layer: torch.nn.Module, weight: torch.Tensor, update: torch.Tensor) -> float:
    """How much of ``x @ update^T`` a layer's bfloat16 outputs carry on average beyond the
    starting weight's: the regression coefficient over 10^6 outputs (1 = all of it)."""
    x = torch.randn(16384, weight.shape[1], generator=torch.Generator().manual_seed(1))
    x = x.to(torch.bfloat16)
    with torch.no_grad():
        got = layer(x).float() - torch.nn.functional.linear(x, weight).float()
    want = x.float() @ update.T
    return float((got * want).sum() / (want * want).sum())


def test_small_updates_shift_bfloat16_outputs_beside_the_weight_not_merged(tiny_llava) -> None:
    """Why updates stay beside the weights: merged into bfloat16 weights (the naive way, a
    planted bug) most of a 1e-4 update is gone from the weight and from the outputs, while
    beside the weight the outputs carry it in full (their own rounding is noise, not bias)."""
    bundle = load_llava(tiny_llava, model_settings("bf16"))
    linear = next(iter(language_model_linears(bundle.model, ["q_proj"]).values()))
    weight = linear.weight.detach().clone()
    update = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    update *= RELATIVE * weight.float().norm() / update.norm()
    merged = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=torch.bfloat16)
    merged.weight.data = (weight.float() + update).to(torch.bfloat16)
    assert relative_error(merged.weight.float() - weight.float(), update) > 0.5
    assert abs(output_shift(merged, weight, update) - 1) > 0.3
    beside = UpdatedLinear(linear)
    beside.add(update)  # a full matrix: held in bfloat16, rounded to 2^-9 of itself at most
    assert relative_error(applied_update(beside, weight), update) < 2**-8
    assert abs(output_shift(beside, weight, update) - 1) < 0.05


@pytest.mark.parametrize(("name", "options", "mix"), [
    ("finetune", {}, lambda u: u),
    ("llava_c", {"uir": "none", "consolidation": "modelmix", "alpha": 0.2}, lambda u: 0.2 * u),
    ("llava_c", {"uir": "none", "consolidation": "none"}, lambda u: u),
    ("sefe", {"asd": False}, lambda u: u),
    ("keeplora", {}, lambda u: u),
])
def test_a_small_update_survives_a_stage_and_its_checkpoint_in_bfloat16(
    tiny_llava, ucit_root, tmp_path, name, options, mix
) -> None:
    method = method_on(name, tiny_llava, ucit_root, tmp_path, "bf16", **options)
    start = {n: p.detach().clone() for n, p in method.context.bundle.model.named_parameters()}
    model = method.before_stage(method.context.bundle.model, stage())
    method.context.note_trainable(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # LoRA and projector
    assert method.context.bundle.model.get_input_embeddings().weight.dtype == torch.bfloat16
    expected = small_lora(model, seed=1)
    model = method.after_stage(model, stage())
    method.save(model, tmp_path / "checkpoint")

    fresh = method_on(name, tiny_llava, ucit_root, tmp_path, "bf16", **options)
    loaded = fresh.load(tmp_path / "checkpoint")
    for name_, update in expected.items():
        for m in (model, loaded):  # the run's model, and the one rebuilt from its checkpoint
            layer = m.get_submodule(name_)
            assert layer.weight.dtype == torch.bfloat16
            assert relative_error(applied_update(layer, start[f"{name_}.weight"]),
                                  mix(update)) < 0.01


def test_export_merges_the_updates_in_float32(tiny_llava, ucit_root, tmp_path) -> None:
    from cl_bench.models.updates import merged_state

    method = method_on("finetune", tiny_llava, ucit_root, tmp_path, "bf16")
    model = method.before_stage(method.context.bundle.model, stage())
    expected = small_lora(model, seed=3)
    model = method.after_stage(model, stage())
    state = merged_state(model, torch.float32)
    name, update = next(iter(expected.items()))
    weight = model.get_submodule(name).weight.float()
    assert torch.allclose(state[f"{name}.weight"], weight + update, rtol=0, atol=1e-9)
    assert state[f"{name}.weight"].dtype == torch.float32


def test_float32_updates_merge_and_replay_bit_for_bit(tiny_llava, ucit_root, tmp_path) -> None:
    method = method_on("finetune", tiny_llava, ucit_root, tmp_path, "fp32")
    model = method.context.bundle.model
    for index in (1, 2):
        model = method.before_stage(model, stage(index))
        method.context.note_trainable(model)
        small_lora(model, seed=index)
        with torch.no_grad():
            projector(model).linear_1.weight.add_(0.01)
        model = method.after_stage(model, stage(index))
    method.save(model, tmp_path / "checkpoint")
    loaded = method_on("finetune", tiny_llava, ucit_root, tmp_path, "fp32").load(
        tmp_path / "checkpoint")
    run_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert run_state.keys() == loaded_state.keys()
    assert all(torch.equal(run_state[k], loaded_state[k]) for k in run_state)
    layer = next(m for m in loaded.modules() if isinstance(m, UpdatedLinear))
    assert layer.merged and layer.ranks == [4, 4]
    checkpoint_mb = sum(p.stat().st_size for p in (tmp_path / "checkpoint").iterdir()) / 2**20
    model_mb = sum(p.numel() * p.element_size() for p in loaded.parameters()) / 2**20
    assert checkpoint_mb < model_mb / 2  # what changed, not a copy of the model


def test_a_full_update_into_bfloat16_parameters_is_refused(tiny_llava) -> None:
    model = load_llava(tiny_llava, model_settings("bf16")).model
    name = next(n for n, p in model.named_parameters() if "norm" in n)
    delta = StageDelta(full={name: torch.ones_like(dict(model.named_parameters())[name])})
    with pytest.raises(CLBenchError, match=f"full update of {name}"):
        apply_delta(model, delta, lambda u: u)


def test_update_layers_keep_float32_factors_and_refuse_a_wrong_shape(tiny_llava) -> None:
    model = load_llava(tiny_llava, model_settings("bf16")).model
    name, linear = next(iter(language_model_linears(model, ["q_proj"]).items()))
    layer = UpdatedLinear(linear)
    layer.add(LoraFactors(torch.ones(linear.out_features, 2, dtype=torch.bfloat16),
                          torch.ones(2, linear.in_features, dtype=torch.bfloat16), 0.5))
    assert layer.update_B.dtype == layer.update_A.dtype == torch.float32
    assert torch.allclose(layer.delta(), torch.full(linear.weight.shape, 1.0))
    with pytest.raises(CLBenchError, match="update of shape"):
        layer.add(torch.zeros(2, 2))


def test_an_update_of_a_missing_or_non_linear_module_is_refused() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
    with pytest.raises(CLBenchError, match="update for module '2', absent from the model"):
        add_update(model, "2", torch.zeros(3, 3))
    with pytest.raises(CLBenchError, match="update for '1', a ReLU, not a linear layer"):
        add_update(model, "1", torch.zeros(3, 3))
    x = torch.ones(1, 3)
    before = model[0](x)
    add_update(model, "0", torch.ones(3, 3))
    assert isinstance(model[0], UpdatedLinear)
    assert torch.allclose(model[0](x) - before, torch.full((1, 3), 3.0))


@pytest.mark.parametrize("name", ["seq_lora", "olora"])
def test_a_carried_lora_shifts_bfloat16_outputs_in_full_at_evaluation(
    tiny_llava, ucit_root, tmp_path, name
) -> None:
    """Methods that keep their LoRAs unmerged evaluate them beside the weights: PEFT's layer
    adds the LoRA to its already rounded bfloat16 output and loses most of a 1e-4 update."""
    method = method_on(name, tiny_llava, ucit_root, tmp_path, "bf16")
    model = method.before_stage(method.context.bundle.model, stage())
    expected = small_lora(model, seed=4, adapter="stage_1" if name == "olora" else "default")
    lora_name, update = next(iter(expected.items()))
    peft_layer = model.get_submodule("base_model.model." + lora_name)
    weight = peft_layer.get_base_layer().weight.detach().clone()
    assert abs(output_shift(peft_layer, weight, update) - 1) > 0.3
    evaluated = method.eval_model(method.after_stage(model, stage()))
    unchanged = isinstance(evaluated, type(model))  # still the PEFT model
    layer = evaluated.get_submodule(("base_model.model." if unchanged else "") + lora_name)
    assert abs(output_shift(layer, weight, update) - 1) < 0.05


def test_a_moelora_update_shifts_bfloat16_outputs_in_full() -> None:
    """One expert (gate 1): the layer adds scaling * B A x before its single rounding."""
    from methods.moelora import MoELoRALinear

    gen = torch.Generator().manual_seed(2)
    base = torch.nn.Linear(64, 48, bias=False, dtype=torch.bfloat16)
    layer = MoELoRALinear(base, experts=1, rank=4, scaling=2.0, dropout=0.0)
    with torch.no_grad():
        layer.B.copy_(torch.randn(layer.B.shape, generator=gen))
        update = 2.0 * layer.B @ layer.A
        layer.B.mul_(RELATIVE * base.weight.float().norm() / update.norm())
        update = 2.0 * layer.B @ layer.A
    assert abs(output_shift(layer, base.weight.detach(), update) - 1) < 0.05


def test_model_tailor_keeps_its_patch_beside_bfloat16_weights(tiny_llava, ucit_root,
                                                              tmp_path) -> None:
    """The tailored patch of a 1e-4 update: the bfloat16 weights are untouched and the kept
    entries (compensation none: the update's own) are applied in full, in float32."""
    method = method_on("model_tailor", tiny_llava, ucit_root, tmp_path, "bf16",
                       calibration_samples=2, calibration_batch=2, compensation="none")
    start = {n: p.detach().clone() for n, p in method.context.bundle.model.named_parameters()}
    model = method.before_stage(method.context.bundle.model, stage())
    expected = small_lora(model, seed=5)
    model = method.after_stage(model, stage())
    for name, update in expected.items():
        layer = model.get_submodule(name)
        assert torch.equal(layer.weight, start[f"{name}.weight"])
        patch = layer.delta()
        kept = patch != 0
        assert 0.05 < kept.float().mean() <= 0.1 + 1e-9
        # the dense patch is held in bfloat16: rounded to 2^-9 of each entry at most
        assert relative_error(patch[kept], update[kept]) < 2**-8


def test_the_float32_output_matmul_trains() -> None:
    """``mm(..., out_dtype=float32)`` (CUDA's single-rounding path, run here on the meta device)
    has no derivative, so a layer with updates beside its weights could not train through it;
    Float32Output gives ``grad W`` with respect to the input, in the weight's dtype."""
    from cl_bench.models.updates import Float32Output

    x = torch.randn(4, 8, dtype=torch.bfloat16, device="meta", requires_grad=True)
    w = torch.randn(6, 8, dtype=torch.bfloat16, device="meta")
    with pytest.raises(RuntimeError, match="derivative for aten::mm is not implemented"):
        torch.mm(x, w.T, out_dtype=torch.float32).sum().backward()
    out = Float32Output.apply(x, w)
    out.sum().backward()
    assert out.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    grad, weight = torch.randn(4, 6, generator=gen), torch.randn(6, 8, generator=gen)
    cpu_x = torch.randn(4, 8, generator=gen, requires_grad=True)
    torch.nn.functional.linear(cpu_x, weight).backward(grad)  # the reference gradient
    saved = type("Saved", (), {"saved_tensors": (weight,)})()
    assert torch.allclose(Float32Output.backward(saved, grad)[0], cpu_x.grad)
