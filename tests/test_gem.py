"""GEM: the dual QP against hand-solved cases, the projection inside a real training step, the
optimizer-step hook of the trainer, options, dtype and resume."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from method_kit import load_tiny, make_context, quick_argv, run_and_resume, stage, train_stage

from cl_bench.cli import main
from cl_bench.errors import CLBenchError
from cl_bench.method import parse_options
from cl_bench.models.batching import training_batches
from cl_bench.running.training import train_model
from methods.gem import GEM, FlatGradients, GEMOptions, project_gradient, solve_dual, violates
from methods.seq_lora import SeqLoRA, trainable_parameters


# -- GEM eq. 10-11 by hand ----------------------------------------------------------------------
def test_one_violated_constraint_projects_onto_its_boundary() -> None:
    g, G = torch.tensor([1.0, -1.0]), torch.tensor([[0.0, 1.0]])
    # dual: min 1/2 v^2 + (g . g1) v = 1/2 v^2 - v, v >= 0: v = 1; g~ = g + g1 = (1, 0)
    assert solve_dual(G @ G.T, G @ g, 0.0).tolist() == pytest.approx([1.0])
    assert project_gradient(g, G, 0.0).tolist() == pytest.approx([1.0, 0.0])


def test_a_violated_constraint_can_stay_inactive() -> None:
    # g = (1, -2) violates both g1 = (0, 1) (dot -2) and g2 = (1, 1) (dot -1); the closest point
    # of the cone {x2 >= 0, x1 + x2 >= 0} is (1, 0), which needs g1 alone: v = (2, 0).
    # KKT: P = [[1, 1], [1, 2]], q = (-2, -1): P v + q = (0, 1), >= 0 where v2 = 0.
    g, G = torch.tensor([1.0, -2.0]), torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    assert solve_dual(G @ G.T, G @ g, 0.0).tolist() == pytest.approx([2.0, 0.0])
    assert project_gradient(g, G, 0.0).tolist() == pytest.approx([1.0, 0.0])


def test_the_margin_lifts_every_multiplier_to_gamma() -> None:
    # gamma = 0.5: v2 = 0.5 at its bound; v1 from d/dv1 = v1 + v2 - 2 = 0: 1.5 (>= 0.5);
    # d/dv2 = v1 + 2 v2 - 1 = 1.5 > 0 (bound active). g~ = g + 1.5 g1 + 0.5 g2 = (1.5, 0)
    g, G = torch.tensor([1.0, -2.0]), torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    assert solve_dual(G @ G.T, G @ g, 0.5).tolist() == pytest.approx([1.5, 0.5])
    assert project_gradient(g, G, 0.5).tolist() == pytest.approx([1.5, 0.0])


def is_kkt_point(v: torch.Tensor, P: torch.Tensor, q: torch.Tensor, margin: float) -> bool:
    """The dual's optimality certificate: v >= margin, gradient P v + q >= 0, and zero where
    v > margin (complementary slackness); enough for a convex QP."""
    grad = P @ v + q
    return bool((v >= margin - 1e-8).all() and (grad >= -1e-7).all()
                and ((v - margin) * grad).abs().max() < 1e-7)


@pytest.mark.parametrize(("tasks", "size"), [(4, 9), (6, 4), (10, 30)])
def test_active_set_meets_the_kkt_conditions_on_random_conflicts(tasks, size) -> None:
    gen = torch.Generator().manual_seed(tasks)  # (6, 4): more tasks than dimensions, P singular
    for trial in range(20):
        G = torch.randn(tasks, size, generator=gen, dtype=torch.float64)
        g = torch.randn(size, generator=gen, dtype=torch.float64) - 0.5 * G.sum(0)
        margin = 0.3 * (trial % 2)
        assert is_kkt_point(solve_dual(G @ G.T, G @ g, margin), G @ G.T, G @ g, margin)
        projected = project_gradient(g, G, margin)
        assert bool((G @ projected >= -1e-8).all())  # no earlier task's loss increases


def test_violates_only_on_a_negative_inner_product() -> None:
    G = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert not violates(torch.tensor([1.0, 0.0]), G)  # orthogonal to g1: allowed
    assert violates(torch.tensor([1.0, -0.1]), G)


def test_flat_gradients_round_trip_and_fill_missing_with_zeros() -> None:
    a = torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.bfloat16))
    b = torch.nn.Parameter(torch.zeros(3))
    a.grad = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16)
    flat = FlatGradients([a, b])
    read = flat.read(torch.empty(flat.size))
    assert read.dtype == torch.float32 and read.tolist() == [1, 2, 3, 4, 0, 0, 0]
    flat.write(torch.arange(7.0))
    assert a.grad.dtype == torch.bfloat16 and a.grad.tolist() == [[0, 1], [2, 3]]
    assert b.grad.tolist() == [4, 5, 6]


@pytest.mark.parametrize(("given", "match"), [
    ({"memory_per_task": 0}, "memory_per_task=0"),
    ({"memory_strength": -0.1}, "memory_strength=-0.1"),
    ({"memory_batch_size": 0}, "memory_batch_size=0"),
])
def test_bad_options_are_clear_errors(given, match) -> None:
    with pytest.raises(CLBenchError, match=match):
        parse_options(GEM, given)


def test_deepspeed_is_refused_before_training(tiny_llava, ucit_root, tmp_path) -> None:
    ctx = make_context("gem", tiny_llava, ucit_root, tmp_path, real_training=True)
    ctx.config.train.deepspeed = "zero2.json"
    with pytest.raises(CLBenchError, match="DeepSpeed"):
        GEM(GEMOptions(), ctx).before_stage(ctx.bundle.model, stage(1, "ImageNet-R"))


# -- the trainer's optimizer-step hook ----------------------------------------------------------
class FrozenBySteps(SeqLoRA):
    """A LoRA method whose optimizer-step hook records the step's gradient and then zeroes it."""

    def __init__(self, options, context) -> None:
        super().__init__(options, context)
        self.norms: list[float] = []

    def before_optimizer_step(self, model) -> None:
        grads = [p.grad for p in trainable_parameters(model).values() if p.grad is not None]
        self.norms.append(float(sum(g.float().pow(2).sum() for g in grads)))
        for g in grads:
            g.zero_()


def test_the_hook_runs_once_per_optimizer_step_before_it(tiny_llava, ucit_root, tmp_path) -> None:
    ctx = make_context("seq_lora", tiny_llava, ucit_root, tmp_path, real_training=True)
    ctx.config.train.grad_accum, ctx.config.train.weight_decay = 2, 0.0
    method = FrozenBySteps(None, ctx)
    model = method.before_stage(ctx.bundle.model, stage(1, "ImageNet-R"))
    start = {n: p.detach().clone() for n, p in trainable_parameters(model).items()}
    train_model(model, ctx.bundle, method.training_samples(stage(1, "ImageNet-R")),
                ctx.config.train, tmp_path / "trainer", 0,
                before_step=functools.partial(method.before_optimizer_step, model))
    assert len(method.norms) == 3 and min(method.norms) > 0  # 3 steps of 2 micro-batches each
    for name, p in trainable_parameters(model).items():  # zeroed before the step: nothing moved
        assert torch.equal(p, start[name]), name


# -- GEM in the model ---------------------------------------------------------------------------
def memory_gradient(method: GEM, model, flat: FlatGradients) -> torch.Tensor:
    samples = [method.context.train_sample(*ref) for ref in method.memories[0]]
    batch = next(training_batches(samples, method.context.bundle, len(samples), 512,
                                  torch.device("cpu")))
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return flat.read(torch.empty(flat.size)).clone()


@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_a_conflicting_step_is_projected_onto_the_memory_constraint(
    tiny_llava, ucit_root, tmp_path, margin
) -> None:
    ctx = make_context("gem", tiny_llava, ucit_root, tmp_path, real_training=True)
    method = GEM(GEMOptions(memory_per_task=4, memory_batch_size=4, memory_strength=margin), ctx)
    model, _ = train_stage(method, ctx.bundle.model, 1, "ImageNet-R")
    assert len(method.memories) == 1 and len(method.memories[0]) == 4
    model = method.before_stage(model, stage(2, "ArxivQA"))
    model.eval()  # no dropout: the hook's memory gradient is the one computed here
    flat = FlatGradients(list(trainable_parameters(model).values()))
    g_mem = memory_gradient(method, model, flat)
    noise = torch.randn(flat.size, generator=torch.Generator().manual_seed(1))
    noise -= (noise @ g_mem) / (g_mem @ g_mem) * g_mem  # orthogonal to g_mem
    flat.write(-g_mem + noise)  # a step that raises the memory loss
    method.before_optimizer_step(model)
    projected = flat.read(torch.empty(flat.size))
    # GEM: g~ = g + v g_mem with v = max(1, margin) = 1 here: the conflict is removed exactly
    assert torch.allclose(projected, noise, atol=1e-5 * float(noise.norm()))
    assert method.projected == 1
    flat.write(g_mem + noise)  # no conflict: the step is left as it is
    method.before_optimizer_step(model)
    assert torch.allclose(flat.read(torch.empty(flat.size)), g_mem + noise)
    assert method.projected == 1


def test_hook_keeps_each_gradients_dtype_on_a_bf16_model(tiny_llava, ucit_root, tmp_path) -> None:
    ctx = make_context("gem", tiny_llava, ucit_root, tmp_path, real_training=True)
    ctx.bundle = load_tiny(tiny_llava, "bf16")
    method = GEM(GEMOptions(memory_per_task=2), ctx)
    model = method.before_stage(ctx.bundle.model, stage(1, "ImageNet-R"))
    model = method.after_stage(model, stage(1, "ImageNet-R"))
    model = method.before_stage(model, stage(2, "ArxivQA"))
    params = list(trainable_parameters(model).values())
    for p in params:
        p.grad = -torch.ones_like(p)
    method.before_optimizer_step(model)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert torch.bfloat16 in frozen and method.projected == 1  # memory passes on a bf16 model
    assert all(p.grad.dtype == p.dtype and p.grad.device == p.device for p in params)


@pytest.mark.slow
def test_quick_run_resumes_with_its_memories(ucit_root, tiny_llava, tmp_path, monkeypatch) -> None:
    whole, _ = run_and_resume("gem", ucit_root, tiny_llava, tmp_path, monkeypatch,
                              "method.memory_per_task=3")
    record = [line for line in (whole / "records.jsonl").read_text().splitlines()][-1]
    assert '"steps": 3' in record  # every stage-2 step computed the memory gradient


def test_bad_option_stops_a_run_before_its_folder(ucit_root, tiny_llava, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(quick_argv("gem", ucit_root, tiny_llava, out, "method.memory_per_task=-1")) == 2
    assert "memory_per_task=-1" in capsys.readouterr().err
    assert not out.exists()


def test_a_mid_stage_resume_draws_the_same_memory_batches(tiny_llava, ucit_root, tmp_path) -> None:
    ctx = make_context("gem", tiny_llava, ucit_root, tmp_path, real_training=True)
    options = GEMOptions(memory_per_task=8, memory_batch_size=2)
    method = GEM(options, ctx)
    method.memories = [[("ImageNet-R", i) for i in range(8)]]
    method.stage_index, method.steps = 2, 5  # five steps into stage 2 at the Trainer checkpoint
    again = GEM(options, ctx)
    again.stage_index = 2  # what before_stage set; then the Trainer restores the method state
    again.load_state(json.loads(json.dumps(method.state())))
    cpu = torch.device("cpu")
    picked = method._memory_batch(method.memories[0], 0, cpu)["input_ids"]
    assert torch.equal(again._memory_batch(again.memories[0], 0, cpu)["input_ids"], picked)
