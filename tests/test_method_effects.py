"""Each method's defining effect, measured on the model its hooks leave behind, with the method's
own defaults: LLaVA-c's consolidation and UIR (and their variants), ModelMix, HiDe-LLaVA's
routing, zero-shot and multitask. The new baselines' effects are in test_baselines.py."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import INQUIRIES, INQUIRY_FILE
from fixture_suite import NAME, fixture_suite
from method_kit import LORA_ALPHA, RANK, batch_of, make_method, stage, train

from cl_bench.cli import main
from cl_bench.config import RunConfig
from cl_bench.evaluation.generation import generate_answers, generate_texts
from cl_bench.evaluation.probes import final_hidden_states, language_shift, load_inquiries
from cl_bench.models.batching import collate_batch, prompt_item
from cl_bench.models.deltas import load_stage_delta
from cl_bench.models.llava import load_image, load_llava
from methods.llava_c.consolidation import sac_delta
from tasks.loaders import load_test_samples
from tasks.suites.ucit import UCIT


@pytest.fixture(autouse=True)
def suite_cache(tmp_path: Path, monkeypatch) -> None:
    """The fixture suite, its default encoder built in this test's cache."""
    fixture_suite()
    monkeypatch.setenv("CLBENCH_CACHE", str(tmp_path / "cache"))


def nudge(model: torch.nn.Module, seed: int) -> None:
    """Stand-in for training: random LoRA B factors and a nudged projector."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_((0.5 if "lora_B" in name else 0.01) * torch.randn(p.shape, generator=gen))


def stage_updates(model: torch.nn.Module, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a stage trained, by parameter name of the plain model: every LoRA's
    (alpha / rank) B @ A and every other trained parameter's change."""
    updates = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            B, A = module.lora_B["default"].weight, module.lora_A["default"].weight
            plain = name.removeprefix("base_model.model.") + ".weight"
            updates[plain] = (LORA_ALPHA / RANK) * (B @ A).detach()
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_" not in name:
            plain = name.removeprefix("base_model.model.")
            updates[plain] = p.detach() - base[plain]
    return updates


def sac(update: torch.Tensor, alpha: float) -> torch.Tensor:
    """SAC of a matrix; any other tensor is scaled by alpha (LLaVA-c eq. 4-7, spec)."""
    return sac_delta(update, alpha) if update.ndim == 2 else alpha * update


UIR = {"llava_c", "llava_c_uir", "llava_c_fkl"}  # the variants that regularise while training
CONSOLIDATED = {  # what each variant adds to the weights, with its default alpha (LLaVA-c: 0.2)
    "llava_c": lambda u: sac(u, 0.2),
    "llava_c_sac": lambda u: sac(u, 0.2),
    "llava_c_replay": lambda u: sac(u, 0.2),
    "llava_c_fkl": lambda u: sac(u, 0.2),
    "modelmix": lambda u: 0.2 * u,
    "llava_c_uir": lambda u: u,
    "finetune": lambda u: u,  # the plain merge every consolidation is compared with
}
PLAIN_MERGE = {"llava_c_uir", "finetune"}


@pytest.mark.parametrize(("method", "options", "expected"), [
    *[(name, {}, consolidate) for name, consolidate in CONSOLIDATED.items()],
    ("llava_c", {"alpha": 0.5}, lambda u: sac(u, 0.5)),
    ("modelmix", {"alpha": 0.3}, lambda u: 0.3 * u),
])
def test_consolidated_weights_are_the_base_plus_the_consolidated_update(
    method: str, options: dict, expected, tiny_llava: Path, ucit_root: Path, tmp_path: Path
) -> None:
    lc = make_method(method, tiny_llava, ucit_root, tmp_path, suite=NAME, **options)
    base = {n: p.detach().clone() for n, p in lc.context.bundle.model.named_parameters()}
    at = stage(1, "R")
    model = lc.before_stage(lc.context.bundle.model, at)
    assert set(lc.extra_losses(model, batch_of(lc, at), None)) == ({"uir"} if method in UIR
                                                                 else set())
    nudge(model, 1)
    updates = stage_updates(model, base)
    assert len(updates) > 2 * 7  # every LoRA'd linear layer and the projector
    params = dict(lc.after_stage(model, at).named_parameters())
    assert set(params) == set(base)  # a plain model again
    for name, update in updates.items():
        assert torch.allclose(params[name], base[name] + expected(update), atol=1e-5), name
    merged = [torch.allclose(params[n], base[n] + u, atol=1e-5) for n, u in updates.items()]
    assert all(merged) if method in PLAIN_MERGE else not any(merged)
    if method == "finetune":
        return
    stored = load_stage_delta(tmp_path, 1)  # the raw update, kept for alpha sweeps
    for module, factors in stored.lora.items():
        assert torch.allclose(factors.product(), updates[f"{module}.weight"], atol=1e-6)


def mean_squared(current, previous, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the final hidden states over real tokens (LLaVA-c eq. 8)."""
    a, b = current.hidden_states[-1], previous.hidden_states[-1]
    return ((a - b) ** 2)[mask.bool()].mean()


def forward_kl_by_hand(current, previous, mask: torch.Tensor) -> torch.Tensor:
    """KL(previous || current) of the next-token distributions over real tokens (Fig. 9)."""
    p = torch.softmax(previous.logits, -1)[mask.bool()]
    log_q = torch.log_softmax(current.logits, -1)[mask.bool()]
    return (p * (p.log() - log_q)).sum(-1).mean()


@pytest.mark.parametrize(("method", "distance"), [
    ("llava_c", mean_squared),  # the default: MSE (spec)
    ("llava_c_fkl", forward_kl_by_hand),
])
def test_uir_is_the_distance_to_the_stage_start_on_the_inquiries(
    method: str, distance, tiny_llava: Path, ucit_root: Path, tmp_path: Path
) -> None:
    """Zero at the start of a stage, then the distance between the model and the model the stage
    started from on the inquiries (one batch holds all eight, so their order does not matter)."""
    lc = make_method(method, tiny_llava, ucit_root, tmp_path, suite=NAME, inquiry_batch=8)
    at = stage(1, "R")
    model = lc.before_stage(lc.context.bundle.model, at)
    start = copy.deepcopy(model).eval()
    batch = batch_of(lc, at)
    outputs = model(**batch)
    assert lc.extra_losses(model, batch, outputs)["uir"].item() == 0.0
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    outputs.loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    uir = lc.extra_losses(model, batch, model(**batch))["uir"]
    bundle = lc.context.bundle
    inquiries = collate_batch([prompt_item(bundle, q, None) for q in INQUIRIES * 2], bundle)
    with torch.no_grad():
        now, then = (m(**inquiries, output_hidden_states=True) for m in (model, start))
    expected = distance(now, then, inquiries["attention_mask"])
    assert expected > 1e-6 and uir.item() == pytest.approx(expected.item(), rel=1e-3)
    uir.backward()  # it trains the LoRA
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    assert lora_b.grad is not None and lora_b.grad.abs().sum() > 0


def test_llava_c_replay_trains_on_the_previous_model_answers(
    taught_llava: Path, ucit_root: Path, tmp_path: Path
) -> None:
    lc = make_method("llava_c_replay", taught_llava, ucit_root, tmp_path, suite=NAME)
    at = stage(1, "R")
    bundle = lc.context.bundle
    questions = [s.question for s in lc.inquiries()]
    answers = generate_texts(bundle.model, bundle, [(q, None) for q in questions],
                             lc.context.config.eval.batch_size,
                             lc.context.config.eval.max_new_tokens)
    model = lc.before_stage(bundle.model, at)
    samples = lc.training_samples(at)
    own = lc.context.train_samples(at.tasks[0])
    assert samples[: len(own)] == own
    assert [s.turns for s in samples[len(own):]] == [
        ((q, a),) for q, a in zip(questions, answers, strict=True)]
    assert lc.extra_losses(model, batch_of(lc, at), None) == {}  # no UIR term besides


def test_uir_keeps_the_language_closer_to_the_start(
    taught_llava: Path, ucit_root: Path, tmp_path: Path
) -> None:
    """Training an unseen task (ArxivQA) moves the inquiries' hidden states; UIR moves them less
    (LLaVA-c sec. 4.2). llava_c_uir merges plainly, so only the regulariser differs."""
    inquiries = load_inquiries(ucit_root / INQUIRY_FILE)
    at = stage(1, "A")
    shifts, terms = {}, {}
    for uir in ("mse", "none"):
        lc = make_method("llava_c_uir", taught_llava, ucit_root, tmp_path / uir, suite=NAME,
                         uir=uir)
        train_cfg = lc.context.config.train
        train_cfg.batch_size, train_cfg.max_steps, train_cfg.learning_rate = 8, 10, 0.01
        start = final_hidden_states(lc.context.bundle.model, lc.context.bundle, inquiries, 8)
        model = lc.before_stage(lc.context.bundle.model, at)
        terms[uir] = train(lc, model, at, tmp_path / uir).get("uir")
        model = lc.after_stage(model, at)
        shifts[uir] = language_shift(
            final_hidden_states(model, lc.context.bundle, inquiries, 8), start)
    assert terms["none"] is None and terms["mse"] > 0
    assert shifts["mse"] < 0.5 * shifts["none"], shifts


# -- HiDe-LLaVA ----------------------------------------------------------------------------------
def hide_two_stages(method: str, tiny_llava: Path, ucit_root: Path, tmp_path: Path):
    """A HiDe-LLaVA variant through two stages (ImageNet-R, VizWiz-caption), each stage's LoRA
    and projector nudged as if trained; anchors from the suite's default encoder."""
    hide = make_method(method, tiny_llava, ucit_root, tmp_path, suite=NAME)
    model = hide.context.bundle.model
    for index, letter in enumerate("RV", start=1):
        model = hide.before_stage(model, stage(index, letter))
        nudge(model, index)
        model = hide.after_stage(model, stage(index, letter))
    return hide, model


def cosines(features: torch.Tensor, anchors: list[torch.Tensor]) -> torch.Tensor:
    f = torch.nn.functional.normalize(features.float(), dim=-1)
    a = torch.nn.functional.normalize(torch.stack(anchors).float(), dim=-1)
    return f @ a.T


def task_prompts(hide, letter: str) -> list[tuple[str, object]]:
    (task,) = UCIT.resolve_order(letter)
    return [(s.question, load_image(s.image)) for s in hide.context.train_samples(task)]


@pytest.mark.parametrize(("method", "image_weight", "text_weight"), [
    ("hide_llava", 0.5, 0.5),  # HiDe-LLaVA eq. 4: alpha = beta = 0.5, T = 0.1
    ("hide_llava_image", 1.0, 0.0),  # Figure 4
    ("hide_llava_text", 0.0, 1.0),
])
def test_hide_routes_by_its_default_weights_and_temperature(
    method: str, image_weight: float, text_weight: float, tiny_llava: Path, ucit_root: Path,
    tmp_path: Path
) -> None:
    hide, model = hide_two_stages(method, tiny_llava, ucit_root, tmp_path)
    assembled = hide.eval_model(model)
    experts = hide.experts
    for own, letter in enumerate("RV"):
        prompts = task_prompts(hide, letter)
        hide.before_generate(assembled, prompts, letter)
        images = hide.encoder.image_features([image for _, image in prompts])
        texts = hide.encoder.text_features([question for question, _ in prompts])
        scores = (image_weight * cosines(images, [e.image_anchor for e in experts])
                  + text_weight * cosines(texts, [e.text_anchor for e in experts]))
        expected = torch.softmax(scores / 0.1, dim=-1)
        assert torch.allclose(hide.routing.weights, expected, atol=1e-5)
        if text_weight > 0:  # the tasks differ by their instructions: each goes to its own
            assert hide.routing.weights.argmax(1).tolist() == [own] * len(prompts)


def test_hide_output_follows_the_anchors(tiny_llava: Path, ucit_root: Path, tmp_path: Path) -> None:
    hide, model = hide_two_stages("hide_llava", tiny_llava, ucit_root, tmp_path)
    assembled = hide.eval_model(model)
    prompts = task_prompts(hide, "V")[:3]
    bundle = hide.context.bundle
    batch = collate_batch([prompt_item(bundle, q, image) for q, image in prompts], bundle,
                          left_pad=True)

    def routed_logits() -> tuple[torch.Tensor, torch.Tensor]:
        hide.before_generate(assembled, prompts, "VizWiz-caption")
        with torch.no_grad():
            return hide.routing.weights.clone(), assembled(**batch).logits

    weights, logits = routed_logits()
    assert (weights[:, 1] > 0.8).all()  # VizWiz-caption samples go to its expert
    first = hide.experts[0]  # VizWiz-caption's anchors become ImageNet-R's
    hide.experts[1].image_anchor = first.image_anchor.clone()
    hide.experts[1].text_anchor = first.text_anchor.clone()
    moved, moved_logits = routed_logits()
    assert torch.allclose(moved, torch.full_like(moved, 0.5), atol=1e-5)  # a tie now
    assert not torch.allclose(logits, moved_logits, atol=1e-3)


# -- bounds --------------------------------------------------------------------------------------
def test_multitask_trains_once_on_the_union(tiny_llava: Path, ucit_root: Path,
                                            tmp_path: Path) -> None:
    multitask = make_method("multitask", tiny_llava, ucit_root, tmp_path)
    tasks = UCIT.resolve_order("RAV")
    (only,) = multitask.plan(tasks)
    assert only.index == 1 and only.tasks == tuple(tasks)
    ctx = multitask.context
    assert multitask.training_samples(only) == [s for t in tasks for s in ctx.train_samples(t)]


def test_zeroshot_is_the_starting_model(taught_llava: Path, ucit_root: Path,
                                        tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", "--method", "zeroshot", "--suite", "ucit", "--data-root",
                 str(ucit_root), "--model", str(taught_llava), "--order", "RC", "--out", str(out),
                 "--general", "none", "--set", "eval.max_new_tokens=4"]) == 0
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 1 and not (out / "checkpoints").exists()
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["stage_0"]
    bundle = load_llava(taught_llava, RunConfig().model)  # as the run loaded it
    for task in UCIT.resolve_order("RC"):
        samples = load_test_samples(UCIT.task_files(task, ucit_root))
        answers = generate_answers(bundle.model, bundle, samples, 4, 4)
        rows = [json.loads(line) for line in
                (out / "predictions" / "stage_0" / f"{task.name}.jsonl").read_text().splitlines()]
        assert {r["question_id"]: r["prediction"] for r in rows} == answers
        assert records[0]["scores"][task.name] > 30  # the taught model answers these
