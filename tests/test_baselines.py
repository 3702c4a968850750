"""The papers' baselines: seq_lora, LwF, EWC, O-LoRA and replay. Each core term against a
hand-computed case, then each method's defining effect on the model (not only its output)."""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from method_kit import batch_of, lora_state, make_method, stage, train
from safetensors.torch import save_file

from cl_bench.errors import CLBenchError
from cl_bench.models.batching import training_batches
from methods.ewc import ewc_penalty, fisher_diagonal
from methods.lwf import distillation
from methods.olora import orthogonality_loss
from methods.replay import reservoir_update
from methods.seq_lora import trainable_parameters


# -- hand-computed core terms -------------------------------------------------------------------
def test_lwf_distillation_on_two_logit_rows() -> None:
    previous = torch.tensor([[0.0, 0.0], [1.0, -1.0]])  # row 1: p = (1/2, 1/2)
    current = torch.tensor([[2 * math.log(3.0), 0.0], [1.0, -1.0]])  # row 2 agrees with previous
    # T = 2: row 1 softens to q = softmax(ln 3, 0) = (3/4, 1/4): KL(p||q) = 1/2 ln(4/3); row 2: 0
    assert distillation(current, previous, 2.0).item() == pytest.approx(0.25 * math.log(4 / 3))
    # T = 1: q = softmax(2 ln 3, 0) = (9/10, 1/10): KL = 1/2 ln(5/9) + 1/2 ln 5 = ln(5/3)
    assert distillation(current, previous, 1.0).item() == pytest.approx(0.5 * math.log(5 / 3))
    assert distillation(previous, previous, 2.0).item() == 0.0


def test_ewc_penalty_on_three_parameters() -> None:
    fisher = {"a": torch.tensor(1.0), "b": torch.tensor(2.0), "c": torch.tensor(0.5)}
    anchor = {"a": torch.tensor(0.0), "b": torch.tensor(1.0), "c": torch.tensor(2.0)}
    theta = {"a": torch.tensor(1.0), "b": torch.tensor(1.0), "c": torch.tensor(4.0)}
    # lambda/2 * (1 * 1^2 + 2 * 0^2 + 0.5 * 2^2) with lambda = 2: 3
    assert ewc_penalty(theta, fisher, anchor, 2.0).item() == pytest.approx(3.0)
    assert ewc_penalty(anchor, fisher, anchor, 2.0).item() == 0.0
    moved_b = {**anchor, "b": torch.tensor(2.0)}  # the high-Fisher parameter moves by 1: 2
    moved_c = {**anchor, "c": torch.tensor(3.0)}  # the low-Fisher one by 1: 0.5
    assert ewc_penalty(moved_b, fisher, anchor, 2.0).item() == pytest.approx(2.0)
    assert ewc_penalty(moved_c, fisher, anchor, 2.0).item() == pytest.approx(0.5)


class LinearLoss(torch.nn.Module):
    """loss = sum(w * x): the gradient of w is x."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.3, -0.7]))

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=(self.w * x).sum())


def test_fisher_is_the_mean_squared_gradient() -> None:
    model = LinearLoss()
    batches = [{"x": torch.tensor([1.0, 2.0])}, {"x": torch.tensor([3.0, 0.0])}]
    fisher = fisher_diagonal(model, batches, {"w": model.w})
    assert fisher["w"].tolist() == pytest.approx([(1 + 9) / 2, (4 + 0) / 2])
    assert fisher["w"].dtype == torch.float32 and model.w.grad is None


def test_orthogonality_loss_on_small_a_matrices() -> None:
    old = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    new = torch.tensor([[0.0, 0.0, 2.0], [2.0, -1.0, 0.0]])
    # A_new A_old^T = [[0, 0], [2, -1]]: sum |x| = 3, sum x^2 = 5
    assert orthogonality_loss(new, [old], "l1").item() == pytest.approx(3.0)
    assert orthogonality_loss(new, [old], "squared").item() == pytest.approx(5.0)
    other = torch.tensor([[0.0, 0.0, 1.0]])  # A_new A_other^T = [[2], [0]]
    assert orthogonality_loss(new, [old, other], "l1").item() == pytest.approx(5.0)
    assert orthogonality_loss(torch.tensor([[0.0, 0.0, 3.0]]), [old], "l1").item() == 0.0


class Draws:
    """Scripted draws that check each range Algorithm R asks for."""

    def __init__(self, script: list[tuple[int, int]]) -> None:
        self.script = list(script)

    def randrange(self, stop: int) -> int:
        expected_stop, value = self.script.pop(0)
        assert stop == expected_stop
        return value


def test_reservoir_contents_by_hand() -> None:
    buffer: list[str] = []
    # capacity 2: a, b fill it; c is item 3 (draw in [0, 3): 1 -> slot 1); d item 4 (draw 3:
    # not < 2, dropped); e item 5 (draw 0 -> slot 0)
    seen = reservoir_update(buffer, 0, "abcde", 2, Draws([(3, 1), (4, 3), (5, 0)]))
    assert (buffer, seen) == (["e", "c"], 5)
    # a second stage continues the count: f is item 6 (draw 1 -> slot 1)
    seen = reservoir_update(buffer, seen, "f", 2, Draws([(6, 1)]))
    assert (buffer, seen) == (["e", "f"], 6)


def test_reservoir_keeps_each_item_with_probability_capacity_over_seen() -> None:
    kept = [0] * 10
    for seed in range(4000):
        buffer: list[int] = []
        seen = reservoir_update(buffer, 0, range(6), 3, random.Random(seed))
        reservoir_update(buffer, seen, range(6, 10), 3, random.Random(seed + 10_000))
        for item in buffer:
            kept[item] += 1
    assert all(abs(k / 4000 - 0.3) < 0.03 for k in kept), kept  # 3 of 10 each, across stages


# -- bad options --------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "option", "message"), [
    ("ewc", "ewc_lambda=-1", "must be >= 0"),
    ("ewc", "fisher_batches=0", "must be >= 1"),
    ("lwf", "temperature=0", "must be > 0"),
    ("lwf", "weight=-0.5", "must be >= 0"),
    ("olora", "orth_lambda=-0.1", "must be >= 0"),
    ("olora", "orth_norm=l3", "expected one of"),
    ("replay", "ratio=1.5", "must be in [0, 1]"),
    ("replay", "ratio=-0.1", "must be in [0, 1]"),
    ("replay", "buffer_size=-3", "must be >= 0"),
    ("replay", "replay_file=replay.json", "needs {task}"),
])
def test_bad_options_fail_before_the_run_folder_exists(
    method: str, option: str, message: str, tmp_path: Path, capsys
) -> None:
    from cl_bench.cli import main

    out = tmp_path / "run"
    argv = ["run", "--method", method, "--suite", "ucit", "--data-root", str(tmp_path),
            "--model", str(tmp_path), "--out", str(out), "--set", f"method.{option}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"method.{option.split('=')[0]}" in err and message in err, err
    assert not out.exists()


# -- effects on the model -----------------------------------------------------------------------
def test_seq_lora_carries_one_lora_and_never_touches_the_base_weights(
    tiny_llava: Path, ucit_root: Path, tmp_path: Path
) -> None:
    method = make_method("seq_lora", tiny_llava, ucit_root, tmp_path)
    model = method.context.bundle.model
    q_proj = "model.language_model.layers.0.self_attn.q_proj.weight"
    base = dict(model.named_parameters())[q_proj].detach().clone()
    model = method.before_stage(model, stage(1, "R"))
    train(method, model, stage(1, "R"), tmp_path)
    model = method.after_stage(model, stage(1, "R"))
    after_first = lora_state(model, "default")
    assert any(t.abs().sum() > 0 for n, t in after_first.items() if "lora_B" in n)
    assert method.before_stage(model, stage(2, "A")) is model  # the same LoRA, not a fresh one
    assert all(torch.equal(t, lora_state(model, "default")[n]) for n, t in after_first.items())
    train(method, model, stage(2, "A"), tmp_path)
    model = method.after_stage(model, stage(2, "A"))
    assert not all(torch.equal(t, lora_state(model, "default")[n]) for n, t in after_first.items())
    weight = dict(model.named_parameters())[f"base_model.model.{q_proj.replace('.weight', '')}"
                                            ".base_layer.weight"]
    assert torch.equal(weight, base)  # never merged


def test_lwf_is_zero_against_itself_and_grows_after_a_step(
    tiny_llava: Path, ucit_root: Path, tmp_path: Path
) -> None:
    method = make_method("lwf", tiny_llava, ucit_root, tmp_path)
    at = stage(1, "R")
    model = method.before_stage(method.context.bundle.model, at)
    batch = batch_of(method, at)
    assert method.extra_losses(model, batch, model(**batch))["lwf"].item() == 0.0
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**batch).loss.backward()
    optimizer.step()
    moved = method.extra_losses(model, batch, model(**batch))["lwf"]
    assert moved.item() > 1e-4
    moved.backward()  # the distillation term reaches the trainable parameters
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    assert lora_b.grad is not None and lora_b.grad.abs().sum() > 0


def test_ewc_fisher_is_the_trainable_parameters_only_and_penalises_moves(
    tiny_llava: Path, ucit_root: Path, tmp_path: Path
) -> None:
    method = make_method("ewc", tiny_llava, ucit_root, tmp_path, fisher_batches=3, ewc_lambda=2.0)
    at = stage(1, "R")
    model = method.before_stage(method.context.bundle.model, at)
    train(method, model, at, tmp_path)
    model = method.after_stage(model, at)
    trainable = trainable_parameters(model)
    assert set(method.fisher) == set(trainable) == set(method.anchor)
    for name, f in method.fisher.items():
        assert f.dtype == torch.float32 and f.shape == trainable[name].shape
        assert f.device == trainable[name].device
    assert sum(f.numel() for f in method.fisher.values()) < 0.5 * sum(
        p.numel() for p in model.parameters())
    method.before_stage(model, stage(2, "A"))
    batch = batch_of(method, stage(2, "A"))
    assert method.extra_losses(model, batch, None)["ewc"].item() == 0.0  # at theta*
    name, fisher = max(method.fisher.items(), key=lambda kv: kv[1].max().item())
    index = int(fisher.argmax())
    with torch.no_grad():
        trainable[name].view(-1)[index] += 0.1
    expected = 2.0 / 2 * fisher.view(-1)[index].item() * 0.1**2
    assert method.extra_losses(model, batch, None)["ewc"].item() == pytest.approx(expected,
                                                                                  rel=1e-3)
    assert expected > 0
    with torch.no_grad():
        trainable[name].view(-1)[index] -= 0.1
    first = {n: f.clone() for n, f in method.fisher.items()}
    method.after_stage(model, at)  # the same stage again: the same Fisher, accumulated
    assert all(torch.allclose(method.fisher[n], 2 * f) for n, f in first.items())


def test_olora_freezes_earlier_loras_bit_for_bit_and_orthogonalises_the_new_one(
    tiny_llava: Path, ucit_root: Path, tmp_path: Path
) -> None:
    first, second = stage(1, "R"), stage(2, "A")

    def two_stages(orth_lambda: float):
        method = make_method("olora", tiny_llava, ucit_root, tmp_path, orth_lambda=orth_lambda)
        method.context.config.train.learning_rate = 0.005
        model = method.before_stage(method.context.bundle.model, first)
        train(method, model, first, tmp_path)
        model = method.after_stage(model, first)
        kept = lora_state(model, "stage_1")
        model = method.before_stage(model, second)
        assert model.active_adapters == ["stage_1", "stage_2"]
        grads = {n: p.requires_grad for n, p in model.named_parameters() if "lora_" in n}
        assert not any(g for n, g in grads.items() if ".stage_1." in n)
        assert all(g for n, g in grads.items() if ".stage_2." in n)
        overlap = [orthogonality_loss(new, old, "l1").item() for new, old in method.pairs]
        train(method, model, second, tmp_path)
        assert all(torch.equal(t, lora_state(model, "stage_1")[n]) for n, t in kept.items())
        after = [orthogonality_loss(new, old, "l1").item() for new, old in method.pairs]
        return method, method.after_stage(model, second), sum(overlap), sum(after)

    _, _, start, free = two_stages(0.0)
    method, model, start_orth, after_orth = two_stages(5.0)
    assert after_orth < 0.6 * start_orth and free > 0.9 * start  # the term drives A_2 away
    # inference: both LoRAs at once, the base model + the sum of every B_i A_i (concatenation)
    batch = batch_of(method, second, 2)
    merged = copy.deepcopy(model).merge_and_unload()
    with torch.no_grad():
        both = model(**batch).logits
        model.base_model.set_adapter(["stage_2"])
        only_new = model(**batch).logits
    assert torch.allclose(both, merged(**batch).logits, atol=1e-5)
    assert not torch.allclose(both, only_new, atol=1e-4)


def test_replay_mixes_the_stage_1_samples_the_seed_picks(
    tiny_llava: Path, ucit_root: Path, tmp_path: Path
) -> None:
    method = make_method("replay", tiny_llava, ucit_root, tmp_path, buffer_size=3, ratio=0.25)
    first, second = stage(1, "R"), stage(2, "A")
    own_first = method.training_samples(first)
    assert len(own_first) == 8  # nothing to replay yet
    method.after_stage(None, first)
    expected: list[tuple[str, int]] = []
    reservoir_update(expected, 0, [("ImageNet-R", i) for i in range(8)], 3,
                     random.Random("reservoir:0:1"))
    assert method.buffer == expected and method.seen == 8
    mixed = method.training_samples(second)
    own_second = method.context.train_samples(second.tasks[0])
    assert mixed[:8] == own_second and len(mixed) == 8 + 2  # ratio 0.25 of 8
    buffered = [own_first[i] for _, i in expected]
    assert all(s in buffered for s in mixed[8:])
    again = make_method("replay", tiny_llava, ucit_root, tmp_path, buffer_size=3, ratio=0.25)
    again.load_state(json.loads(json.dumps(method.state())))  # what --resume restores
    assert again.training_samples(second) == mixed


def test_replay_file_per_task(tiny_llava: Path, ucit_root: Path, tmp_path: Path) -> None:
    replay = tmp_path / "replay"
    replay.mkdir()
    records = json.loads((ucit_root / "UCIT/ImageNet-R/train.json").read_text())[:2]
    (replay / "ArxivQA.json").write_text(json.dumps(records))
    method = make_method("replay", tiny_llava, ucit_root, tmp_path,
                         replay_file=str(replay / "{task}.json"))
    mixed = method.training_samples(stage(2, "A"))
    assert [s.id for s in mixed[-2:]] == [r["id"] for r in records] and len(mixed) == 10
    with pytest.raises(CLBenchError, match=r"replay file for IconQA not found: .*IconQA.json"):
        method.training_samples(stage(3, "I"))


def test_lwf_distils_exactly_the_positions_the_llava_loss_supervises(
    tiny_llava: Path, ucit_root: Path, tmp_path: Path, monkeypatch
) -> None:
    import methods.lwf

    method = make_method("lwf", tiny_llava, ucit_root, tmp_path)
    at = stage(1, "R")
    model = method.before_stage(method.context.bundle.model, at)
    seen = []

    def spy(current, previous, temperature):
        seen.append(current)
        return distillation(current, previous, temperature)

    monkeypatch.setattr(methods.lwf, "distillation", spy)
    batch = batch_of(method, at)
    outputs = model(**batch)
    method.extra_losses(model, batch, outputs)
    labels = batch["labels"]
    loss = torch.nn.functional.cross_entropy(seen[0], labels[labels != -100])
    assert loss.item() == pytest.approx(outputs.loss.item(), rel=1e-5)


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
def test_terms_follow_the_model_device_and_dtype(
    device: str, tiny_llava: Path, ucit_root: Path, tmp_path: Path
) -> None:
    """A bf16 model (on the GPU where there is one): the EWC Fisher in fp32, the anchors and the
    LwF teacher in each parameter's own dtype, every term on the model's device."""
    first, second = stage(1, "R"), stage(2, "A")
    for name in ("ewc", "lwf", "olora"):
        method = make_method(name, tiny_llava, ucit_root, tmp_path / name, fisher_batches=2) \
            if name == "ewc" else make_method(name, tiny_llava, ucit_root, tmp_path / name)
        model = method.context.bundle.model.to(device=device, dtype=torch.bfloat16)
        model = method.before_stage(model, first)
        model = method.after_stage(model, first)
        model = method.before_stage(model, second)
        batch = {k: v.to(device) for k, v in batch_of(method, second, 2).items()}
        term = next(iter(method.extra_losses(model, batch, model(**batch)).values()))
        assert term.device.type == device and term.dtype == torch.float32 and term.isfinite()
        params = dict(model.named_parameters())
        for n, f in getattr(method, "fisher", {}).items():
            assert f.dtype == torch.float32 and f.device == params[n].device
            assert method.anchor[n].dtype == params[n].dtype
        for n, t in getattr(method, "teacher", {}).items():
            assert t.dtype == params[n].dtype and t.device == params[n].device


def test_ewc_refuses_a_state_that_does_not_fit_the_model(
    tiny_llava: Path, ucit_root: Path, tmp_path: Path
) -> None:
    method = make_method("ewc", tiny_llava, ucit_root, tmp_path, fisher_batches=1)
    at = stage(1, "R")
    model = method.after_stage(method.before_stage(method.context.bundle.model, at), at)
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    method.save(model, folder)
    state = folder / "ewc.safetensors"
    save_file({"fisher::no.such.weight": torch.ones(1)}, str(state))
    with pytest.raises(CLBenchError, match=f"{state}: 'no.such.weight' is no parameter"):
        method.load(folder)
    state.unlink()
    with pytest.raises(CLBenchError, match=f"{state} is missing"):
        method.load(folder)
    method.fisher["no.such.weight"] = torch.ones(1)
    with pytest.raises(CLBenchError, match="Fisher holds 'no.such.weight', which no longer"):
        method.before_stage(model, stage(2, "A"))


# -- the methods' defaults, measured on the model -----------------------------------------------
def test_lwf_defaults_distil_the_stage_start_at_t2_with_weight_1(
    tiny_llava: Path, ucit_root: Path, tmp_path: Path
) -> None:
    method = make_method("lwf", tiny_llava, ucit_root, tmp_path)
    at = stage(1, "R")
    model = method.before_stage(method.context.bundle.model, at)
    start = copy.deepcopy(model).eval()  # the previous model: the stage's starting point
    batch = batch_of(method, at)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**batch).loss.backward()
    optimizer.step()
    outputs = model(**batch)
    with torch.no_grad():
        previous = start(**{k: v for k, v in batch.items() if k != "labels"}).logits
    answer = batch["labels"][:, 1:] != -100
    p = torch.softmax(previous[:, :-1][answer] / 2.0, -1)  # LwF eq. 3, T = 2
    log_q = torch.log_softmax(outputs.logits[:, :-1][answer].detach() / 2.0, -1)
    expected = (p * (p.log() - log_q)).sum(-1).mean()
    assert expected > 1e-4
    lwf = method.extra_losses(model, batch, outputs)["lwf"]
    assert lwf.item() == pytest.approx(expected.item(), rel=1e-4)  # weight lambda_o = 1


def test_ewc_defaults_the_empirical_fisher_of_every_sample_and_lambda_1(
    tiny_llava: Path, ucit_root: Path, tmp_path: Path
) -> None:
    method = make_method("ewc", tiny_llava, ucit_root, tmp_path)
    at = stage(1, "R")
    model = method.before_stage(method.context.bundle.model, at)
    samples = method.training_samples(at)
    trainable = trainable_parameters(model)
    expected = {n: torch.zeros_like(p) for n, p in trainable.items()}
    model.eval()
    for sample in samples:  # every sample (8 < fisher_batches), one at a time
        model.zero_grad()
        one = next(training_batches([sample], method.context.bundle, 1, 512, torch.device("cpu")))
        model(**one).loss.backward()
        for n, p in trainable.items():
            expected[n] += p.grad.pow(2) / len(samples)
    model.zero_grad()
    model.train()
    model = method.after_stage(model, at)
    for n, f in expected.items():
        assert torch.allclose(method.fisher[n], f, rtol=1e-4, atol=1e-12), n
    method.before_stage(model, stage(2, "A"))
    name, fisher = max(method.fisher.items(), key=lambda kv: kv[1].max().item())
    index = int(fisher.argmax())
    with torch.no_grad():
        trainable[name].view(-1)[index] += 0.1
    penalty = method.extra_losses(model, batch_of(method, stage(2, "A")), None)["ewc"]
    assert penalty.item() == pytest.approx(1.0 / 2 * fisher.view(-1)[index].item() * 0.1**2,
                                           rel=1e-3)  # EWC eq. 3 with lambda = 1


def test_olora_defaults_lambda_005_on_the_absolute_overlaps(
    tiny_llava: Path, ucit_root: Path, tmp_path: Path
) -> None:
    method = make_method("olora", tiny_llava, ucit_root, tmp_path)
    first, second = stage(1, "R"), stage(2, "A")
    model = method.before_stage(method.context.bundle.model, first)
    model = method.after_stage(model, first)
    model = method.before_stage(model, second)
    overlaps = sum(
        (module.lora_A["stage_2"].weight @ module.lora_A["stage_1"].weight.T).abs().sum()
        for module in model.modules() if hasattr(module, "lora_A") and "stage_2" in module.lora_A
    )
    assert overlaps > 0
    orth = method.extra_losses(model, batch_of(method, second), None)["orth"]
    assert orth.item() == pytest.approx(0.05 * overlaps.item(), rel=1e-5)  # MCITlib's LLaVA


def test_replay_defaults_mix_as_many_past_samples_as_new_ones(
    tiny_llava: Path, ucit_root: Path, tmp_path: Path
) -> None:
    method = make_method("replay", tiny_llava, ucit_root, tmp_path)
    first, second = stage(1, "R"), stage(2, "A")
    method.after_stage(None, first)
    mixed = method.training_samples(second)
    own = method.context.train_samples(second.tasks[0])
    past = method.context.train_samples(first.tasks[0])
    assert mixed[:8] == own and len(mixed) == 16  # ratio 1: 8 replayed with the 8 new
    assert sorted(s.id for s in mixed[8:]) == sorted(s.id for s in past)  # the buffer kept all
