"""HiDe-LLaVA: routing (eq. 3-5), fusion (eq. 6-7), assembly, anchors, ablations, run folder."""

from __future__ import annotations

import copy
import csv
import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import CLIP
from method_kit import RANK, make_context, stage, trained_like
from run_kit import LEARNING, assert_same_run, kill_after_predictions

from cl_bench.cli import main
from cl_bench.config import RunConfig
from cl_bench.errors import CLBenchError
from cl_bench.evaluation.generation import generate_answers
from cl_bench.method import parse_options
from cl_bench.models.batching import collate_batch
from cl_bench.models.deltas import LoraFactors, stage_delta
from cl_bench.models.encoders import clip_text_batch, load_encoder
from cl_bench.models.llava import encode_prompt, load_image, load_llava
from cl_bench.models.lora import add_lora
from cl_bench.models.routed_lora import RoutedLoRALinear, Routing
from cl_bench.registry import get_method
from methods.hide_llava.assembly import assemble, expert_model, layer_modes
from methods.hide_llava.experts import TaskExpert, load_experts, set_projector
from methods.hide_llava.fusion import FusedLoRALinear, fused_factors
from methods.hide_llava.method import HiDeLLaVA
from methods.hide_llava.options import HiDeOptions, check_options
from methods.hide_llava.routing import routing_weights
from reports.run_folder import read_records
from tasks.loaders import load_samples


# -- fixtures -----------------------------------------------------------------------------------
def task_test_samples(ucit_root, task: str):
    folder = ucit_root / "UCIT" / task
    return load_samples(folder / "test.json", ucit_root / "UCIT" / "datasets")


def batch_of(bundle, ucit_root, task: str = "ImageNet-R", n: int = 3) -> dict:
    items = [{"ids": encode_prompt(bundle, s.question, True), "image": load_image(s.image)}
             for s in task_test_samples(ucit_root, task)[:n]]
    return collate_batch(items, bundle)


# -- eq. 3-5: routing ----------------------------------------------------------------------------
def test_routing_weights_against_a_hand_computed_case() -> None:  # HiDe-LLaVA eq. 4
    image = torch.tensor([[0.9, 0.1], [0.0, 0.0]])
    text = torch.tensor([[0.5, 0.7], [0.5, 0.7]])
    has_image = torch.tensor([True, False])
    d = routing_weights(image, text, has_image, 0.5, 0.5, 0.1)
    # row 0: r-bar = (0.7, 0.4) -> softmax((7, 4)) = (1 / (1 + e^-3), 1 / (1 + e^3))
    # row 1 has no image, routes on text: softmax((5, 7)) = (1 / (1 + e^2), 1 / (1 + e^-2))
    expected = torch.tensor([[1 / (1 + math.exp(-3)), 1 / (1 + math.exp(3))],
                             [1 / (1 + math.exp(2)), 1 / (1 + math.exp(-2))]])
    assert torch.allclose(d, expected, atol=1e-6)
    assert torch.allclose(d.sum(1), torch.ones(2))
    single = routing_weights(image, text, has_image, 1.0, 0.0, 0.1)  # Figure 4, image only
    assert torch.allclose(single[0], torch.softmax(torch.tensor([9.0, 1.0]), 0))


def factors(out: int, inp: int, rank: int, scaling: float, seed: int) -> LoraFactors:
    gen = torch.Generator().manual_seed(seed)
    return LoraFactors(torch.randn(out, rank, generator=gen), torch.randn(rank, inp, generator=gen),
                       scaling)


def test_fused_lora_equals_the_sum_of_deltas() -> None:  # HiDe-LLaVA eq. 6
    experts = [factors(6, 5, 2, 2.0, 1), factors(6, 5, 2, 0.5, 2), factors(6, 5, 2, 1.0, 3)]
    B, A = fused_factors(experts, "sum")
    assert torch.allclose(B @ A, sum(f.product() for f in experts), atol=1e-5)
    B, A = fused_factors(experts, "sum", weight=0.5)
    assert torch.allclose(B @ A, 0.5 * sum(f.product() for f in experts), atol=1e-5)
    B, A = fused_factors(experts, "reference")  # (sum s_i B_i)(sum A_i), cross terms included
    reference = sum(f.scaling * f.B for f in experts) @ sum(f.A for f in experts)
    assert torch.allclose(B @ A, reference, atol=1e-5)
    with pytest.raises(CLBenchError, match="fusion"):
        fused_factors(experts, "mean")


def test_fused_module_adds_the_fused_branch() -> None:  # HiDe-LLaVA eq. 7
    base = torch.nn.Linear(5, 6)
    experts = [factors(6, 5, 2, 2.0, 1), factors(6, 5, 2, 0.5, 2)]
    module = FusedLoRALinear(base, *fused_factors(experts), rank=2)
    x = torch.randn(3, 4, 5)
    delta = sum(f.product() for f in experts)
    assert torch.allclose(module(x), base(x) + x @ delta.T, atol=1e-5)
    assert module.lora_parameters() == 2 * (5 + 6)


# -- assembly ------------------------------------------------------------------------------------
def one_expert(bundle, seed: int = 0) -> tuple[torch.nn.Module, TaskExpert]:
    """A LoRA trained (stand-in) on the base model: the plain model and the stored expert."""
    cfg = RunConfig()
    cfg.lora.rank, cfg.lora.alpha = RANK, 4.0
    model = add_lora(bundle.model, cfg.lora)
    trained_like(model, seed)
    lora = stage_delta(model, {}).lora
    plain = model.unload()
    projector = {n: p.detach().clone() for n, p in plain.named_parameters()
                 if "multi_modal_projector" in n}
    expert = TaskExpert("ImageNet-R", 1, lora, projector, torch.randn(24), torch.randn(24), 4, 4)
    return plain, expert


def merged_reference(model: torch.nn.Module, expert: TaskExpert) -> torch.nn.Module:
    """The task's model the plain way: a full copy, its projector, its LoRA merged."""
    single = copy.deepcopy(model)
    set_projector(single, expert.projector)
    with torch.no_grad():
        for name, factors in expert.lora.items():
            single.get_submodule(name).weight += factors.product()
    return single


@pytest.mark.parametrize(("layout", "fusion"), [
    ("hide", "sum"), ("hide", "reference"), ("merge_all", "sum"), ("expand_all", "sum"),
])
def test_with_one_task_the_assembled_model_is_the_task_model(
    tiny_llava, ucit_root, layout, fusion
) -> None:
    bundle = load_llava(tiny_llava)
    plain, expert = one_expert(bundle)
    batch = batch_of(bundle, ucit_root)
    routing = Routing()
    routing.weights = torch.ones(batch["input_ids"].shape[0], 1)  # softmax over one task
    options = HiDeOptions(layout=layout, fusion=fusion)
    assembled, _ = assemble(plain, [expert], options, routing)
    merged = merged_reference(plain, expert)
    with torch.no_grad():
        got, want = assembled(**batch).logits, merged(**batch).logits
        own = expert_model(plain, expert)(**batch).logits
        untouched = plain(**batch).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert torch.allclose(own, want, atol=1e-4)  # the task's own model, built without a copy
    assert not torch.allclose(untouched, want, atol=1e-3)  # the LoRA does change the model


def test_assembly_leaves_the_model_untouched_and_shares_its_weights(tiny_llava) -> None:
    bundle = load_llava(tiny_llava)
    plain, expert = one_expert(bundle)
    before = {n: p.clone() for n, p in plain.named_parameters()}
    assembled, _ = assemble(plain, [expert, expert], HiDeOptions(), Routing())
    assert all(torch.equal(before[n], p) for n, p in plain.named_parameters())
    assert all(isinstance(m, torch.nn.Linear) for n, m in plain.named_modules() if "q_proj" in n)
    top_q = assembled.get_submodule("model.language_model.layers.1.self_attn.q_proj")
    low_q = assembled.get_submodule("model.language_model.layers.0.self_attn.q_proj")
    assert isinstance(top_q, RoutedLoRALinear) and isinstance(low_q, FusedLoRALinear)
    assert top_q.base.weight is plain.get_submodule(
        "model.language_model.layers.1.self_attn.q_proj").weight


def test_table_3_layouts_and_parameters_loaded(tiny_llava) -> None:
    bundle = load_llava(tiny_llava)
    plain, expert = one_expert(bundle)
    experts = [expert, expert]
    modes = layer_modes(plain, experts, "hide", 1)
    assert {m for n, m in modes.items() if ".layers.1." in n} == {"expand"}
    assert {m for n, m in modes.items() if ".layers.0." in n} == {"merge"}
    # one rank-r LoRA on a tiny layer: q, k, v, o (64 -> 64), gate, up (64 -> 128), down
    text = plain.config.text_config
    assert (text.hidden_size, text.intermediate_size) == (64, 128)
    per_layer = RANK * (4 * (64 + 64) + 3 * (64 + 128))
    anchors = 2 * (24 + 24)
    expected = {  # (LoRA parameters kept, anchors): Table 3's count for two tasks
        "hide": (2 * per_layer + per_layer, anchors),
        "merge_all": (2 * per_layer, 0),
        "merge_rest": (per_layer, 0),
        "expand_all": (2 * 2 * per_layer, anchors),
        "expand_rest": (2 * per_layer, anchors),
    }
    base = sum(p.numel() for p in plain.parameters())
    for layout, (lora, anchor_count) in expected.items():
        _, params = assemble(plain, experts, HiDeOptions(layout=layout), Routing())
        assert (params.model, params.lora, params.anchors) == (base, lora, anchor_count), layout
        assert params.total == base + lora + anchor_count


# -- encoder and anchors -------------------------------------------------------------------------
def test_a_missing_encoder_path_is_a_clear_error(tiny_llava, tmp_path) -> None:
    bundle = load_llava(tiny_llava)
    missing = tmp_path / "no-clip-here"
    with pytest.raises(CLBenchError, match=f"text encoder folder {missing} does not exist"):
        load_encoder(str(missing), bundle)


def test_clip_and_llava_encoders(tiny_llava, tiny_clip) -> None:
    bundle = load_llava(tiny_llava)
    images = [load_image_of_colour((200, 30, 30)), load_image_of_colour((30, 30, 200))]
    long_text = "What colour is the square? " * 40  # far beyond CLIP's 77 positions
    for text_feature in ("pooled", "projected"):
        encoder = load_encoder(str(tiny_clip), bundle, text_feature)
        assert encoder.image_features(images).shape == (2, CLIP.projection_dim)
        assert encoder.text_features(["red", long_text]).shape == (2, CLIP.projection_dim)
    ids, mask = clip_text_batch(encoder.tokenizer, ["red", long_text], 77)
    eos = encoder.tokenizer.eos_token_id
    assert ids.shape[1] == 77 and ids[1, -1] == eos and ids[0, int(mask[0].sum()) - 1] == eos
    llava = load_encoder("llava", bundle)
    config = bundle.model.config
    assert llava.image_features(images).shape == (2, config.vision_config.hidden_size)
    assert llava.text_features(["red", long_text]).shape == (2, config.text_config.hidden_size)


def load_image_of_colour(rgb):
    from PIL import Image

    return Image.new("RGB", (32, 32), rgb)


def test_expert_files_round_trip_and_missing_anchors_are_named(tiny_llava, tmp_path) -> None:
    bundle = load_llava(tiny_llava)
    _, expert = one_expert(bundle)
    expert.save(tmp_path)
    (loaded,) = load_experts(tmp_path)
    assert loaded.task == "ImageNet-R" and set(loaded.lora) == set(expert.lora)
    name = next(iter(expert.lora))
    assert torch.equal(loaded.lora[name].B, expert.lora[name].B)
    assert loaded.lora[name].scaling == expert.lora[name].scaling
    assert torch.equal(loaded.text_anchor, expert.text_anchor)
    expert.text_anchor = None
    expert.save(tmp_path)
    with pytest.raises(CLBenchError, match="stage 1 \\(ImageNet-R\\) has no text anchor"):
        load_experts(tmp_path)[0].check_anchors(tmp_path / expert.file_name)


def test_options_are_checked(tiny_llava, ucit_root, tmp_path) -> None:
    ctx = make_context("hide_llava", tiny_llava, ucit_root, tmp_path)
    with pytest.raises(CLBenchError, match="method.layout='expand_top'"):
        HiDeLLaVA(parse_options(HiDeLLaVA, {"layout": "expand_top"}), ctx)
    with pytest.raises(CLBenchError, match="needs a feature encoder"):
        HiDeLLaVA(HiDeOptions(), ctx)  # ucit (real) has no default encoder
    with pytest.raises(CLBenchError, match="does not exist"):
        HiDeLLaVA(HiDeOptions(encoder=str(tmp_path / "nothing")), ctx)
    assert HiDeLLaVA(HiDeOptions(layout="merge_all"), ctx).encoder is None  # no routing


def test_every_bad_option_is_named_in_one_error() -> None:
    bad = HiDeOptions(fusion="mean", text_feature="last", temperature=0.0, image_weight=0.0,
                      text_weight=0.0, top_layers=0, rank=0)
    with pytest.raises(CLBenchError) as err:
        check_options(bad)
    for named in ("method.fusion='mean'", "method.text_feature='last'", "method.temperature=0.0",
                  "method.image_weight and method.text_weight", "method.top_layers=0",
                  "method.rank=0"):
        assert named in str(err.value)
    check_options(HiDeOptions(image_weight=0.0))  # text alone routes
    with pytest.raises(CLBenchError, match="image_weight"):
        check_options(HiDeOptions(image_weight=-0.2))


def test_ablations_are_registered_methods() -> None:
    expected = {
        "hide_llava_merge_all": {"layout": "merge_all"},
        "hide_llava_merge_rest": {"layout": "merge_rest"},
        "hide_llava_expand_all": {"layout": "expand_all"},
        "hide_llava_expand_rest": {"layout": "expand_rest"},
        "hide_llava_image": {"image_weight": 1.0, "text_weight": 0.0},
        "hide_llava_text": {"image_weight": 0.0, "text_weight": 1.0},
    }
    for name, values in expected.items():
        options = get_method(name).options({})
        assert {k: getattr(options, k) for k in values} == values, name


# -- the method through its hooks -----------------------------------------------------------------
def test_anchors_average_a_seeded_subset_of_anchor_samples(tiny_llava, ucit_root, tiny_clip,
                                                           tmp_path) -> None:
    ctx = make_context("hide_llava", tiny_llava, ucit_root, tmp_path)
    options = HiDeOptions(encoder=str(tiny_clip), anchor_samples=3, encoder_batch=2)
    method = HiDeLLaVA(options, ctx)
    samples = ctx.train_samples(stage(1, "ImageNet-R").tasks[0])
    assert len(samples) == 8
    expert = TaskExpert("ImageNet-R", 1, {})
    method._add_anchors(expert, samples, seed=1)
    chosen = random.Random(1).sample(samples, 3)
    assert expert.anchor_samples == expert.image_samples == 3
    images = method.encoder.image_features([load_image(s.image) for s in chosen])
    texts = method.encoder.text_features([s.question for s in chosen])
    assert torch.allclose(expert.image_anchor, images.mean(0).cpu(), atol=1e-5)
    assert torch.allclose(expert.text_anchor, texts.mean(0).cpu(), atol=1e-5)
    every = method.encoder.image_features([load_image(s.image) for s in samples]).mean(0)
    assert not torch.allclose(expert.image_anchor, every.cpu(), atol=1e-3)  # a subset, not all


def test_stages_anchors_routing_and_checkpoints(tiny_llava, ucit_root, tiny_clip, tmp_path) -> None:
    ctx = make_context("hide_llava", tiny_llava, ucit_root, tmp_path)
    method = HiDeLLaVA(HiDeOptions(encoder=str(tiny_clip)), ctx)
    model = ctx.bundle.model
    for index, task in enumerate(["ImageNet-R", "ArxivQA"], start=1):
        model = method.before_stage(model, stage(index, task))
        trained_like(model, index)
        model = method.after_stage(model, stage(index, task))
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert [e.task for e in method.experts] == ["ImageNet-R", "ArxivQA"]
    for e in method.experts:  # eq. 2: anchors over the task's 8 training samples
        assert e.anchor_samples == 8 and e.image_samples == 8
        assert e.image_anchor.shape == (CLIP.projection_dim,)
        assert (tmp_path / "hide_llava" / e.file_name).is_file()

    evaluated = method.eval_model(model)
    assert evaluated is not model
    for task in ("ImageNet-R", "ArxivQA"):
        samples = task_test_samples(ucit_root, task)
        hook = lambda prompts, label=task: method.before_generate(evaluated, prompts, label)  # noqa: E731
        answers = generate_answers(evaluated, ctx.bundle, samples, 3, 4, task, hook)
        assert len(answers) == len(samples)
    info = method.after_evaluation(stage(2, "ArxivQA"))
    assert set(info["routing_accuracy"]) == {"ImageNet-R", "ArxivQA"}
    assert info["params"]["lora"] > 0 and info["params"]["anchors"] == 2 * 2 * CLIP.projection_dim
    with open(tmp_path / "routing" / "stage_2.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["evaluated", "ImageNet-R", "ArxivQA", "routing_accuracy"]
    assert [sum(map(int, r[1:3])) for r in rows[1:]] == [12, 12]  # every test sample routed once

    checkpoint = tmp_path / "checkpoints" / "stage_2"
    method.save(model, checkpoint)
    fresh = HiDeLLaVA(HiDeOptions(encoder=str(tiny_clip)), ctx)
    fresh.load(checkpoint)
    assert [e.task for e in fresh.experts] == ["ImageNet-R", "ArxivQA"]
    expert_file = checkpoint / "hide_llava" / "task_2.safetensors"
    broken = TaskExpert.load(expert_file)
    broken.image_anchor = None
    broken.save(expert_file.parent)
    with pytest.raises(CLBenchError, match="stage 2 \\(ArxivQA\\) has no image anchor"):
        HiDeLLaVA(HiDeOptions(encoder=str(tiny_clip)), ctx).load(checkpoint)


def hide_argv(ucit_root: Path, model: Path, encoder: Path, out: Path) -> list[str]:
    return ["run", "--method", "hide_llava", "--suite", "ucit", "--data-root", str(ucit_root),
            "--model", str(model), "--quick", "--order", "RC", "--out", str(out),
            "--general", "none", "--set", f"method.encoder={encoder}",
            "--set", "eval.max_new_tokens=4", *LEARNING]


@pytest.fixture(scope="module")
def hide_run(tmp_path_factory, ucit_root: Path, taught_llava: Path, tiny_clip: Path) -> Path:
    out = tmp_path_factory.mktemp("hide") / "run"
    assert main(hide_argv(ucit_root, taught_llava, tiny_clip, out)) == 0
    return out


def run_matrix(run: Path) -> list[list[float]]:
    return [[r["scores"][t] for t in ("ImageNet-R", "CLEVR-Math")] for r in read_records(run)]


def test_end_to_end_run_writes_routing_and_parameters(hide_run: Path) -> None:
    last = read_records(hide_run)[-1]["method"]
    assert last["layout"] == "hide" and last["params"]["total"] > last["params"]["model"]
    assert set(last["routing_accuracy"]) == {"ImageNet-R", "CLEVR-Math"}
    assert all((hide_run / "routing" / f"stage_{t}.csv").is_file() for t in (1, 2))
    report = (hide_run / "report.md").read_text()
    assert "## Method diagnostics" in report and "### Routing after stage 2" in report
    kept = hide_run / "checkpoints" / "stage_2" / "hide_llava"
    experts = sorted(p.name for p in kept.iterdir())
    assert experts == ["task_1.safetensors", "task_2.safetensors"]


def test_the_hide_layout_reproduces_the_run(hide_run: Path) -> None:
    """The run's stages re-assembled under Table 3 layouts: 'hide' gives the run's matrix."""
    matrix = run_matrix(hide_run)
    assert min(matrix[0]) > 10 and matrix[0] != matrix[1] != matrix[2]  # real, moving scores
    assert main(["analyze", "layouts", str(hide_run), "--layouts", "hide,merge_rest"]) == 0
    table = json.loads((hide_run / "layouts" / "layouts.json").read_text())
    assert torch.allclose(torch.tensor(table["hide"]["matrix"]), torch.tensor(matrix))
    assert table["merge_rest"]["params"]["lora"] < table["hide"]["params"]["lora"]


def test_cka_between_the_task_models_of_a_run(hide_run: Path, tmp_path: Path) -> None:
    assert main(["analyze", "cka", "--run", str(hide_run), "--limit", "4",
                 "--out", str(tmp_path / "cka")]) == 0
    assert (tmp_path / "cka" / "cka.csv").read_text().count("\n") == 1 + 2  # header + 2 layers
    assert main(["analyze", "cka", "--run", str(hide_run), "--inputs", "R", "--limit", "4",
                 "--out", str(tmp_path / "cka_same")]) == 0
    assert "model(CLEVR-Math)" in (tmp_path / "cka_same" / "cka.md").read_text()


def test_resume_of_a_killed_hide_llava_run_gives_the_same_run(
    hide_run: Path, ucit_root: Path, taught_llava: Path, tiny_clip: Path, tmp_path: Path,
    monkeypatch
) -> None:
    out = tmp_path / "killed"
    kill_after_predictions(monkeypatch, 5)  # in stage 2's evaluation, its expert written
    with pytest.raises(KeyboardInterrupt):
        main(hide_argv(ucit_root, taught_llava, tiny_clip, out))
    assert (out / "hide_llava" / "task_2.safetensors").is_file()
    monkeypatch.undo()
    assert main(["run", "--out", str(out), "--resume"]) == 0
    assert_same_run(out, hide_run, "hide_llava", "routing")
