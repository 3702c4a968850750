"""MR-LoRA: the router's answer and router set by hand, the routed model = the chosen expert's
model, a router trained to pick experts, checkpoints, options, and an end-to-end run."""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch
from method_kit import make_context, run_and_resume, stage, trained_like

import methods.mr_lora.method as mr_lora_method
from cl_bench.errors import CLBenchError
from cl_bench.method import parse_options
from cl_bench.models.batching import ConversationDataset, collate_batch, prompt_item
from cl_bench.models.llava import load_image
from cl_bench.models.lora import projector_weights, set_projector_weights
from methods.mr_lora.method import MRLoRA, MRLoRAOptions
from methods.mr_lora.router import chosen_expert, router_samples, routing_question
from tasks.loaders import Sample, load_samples


# -- the router by hand --------------------------------------------------------------------------
def test_the_router_answer_selects_the_expert() -> None:
    rng = random.Random(0)
    assert chosen_expert("B", 3, rng) == (1, True)
    assert chosen_expert(" B.", 3, rng) == (1, True)  # one extra character is allowed
    assert chosen_expert("CA", 3, rng) == (0, True)  # the first letter of the pool wins
    expected = random.Random(5)
    for answer in ("C and A", "D", "", "none"):  # invalid: a random expert (reference)
        index, valid = chosen_expert(answer, 3, random.Random(5))
        assert (index, valid) == (expected.randrange(3), False)
        expected = random.Random(5)
    with pytest.raises(CLBenchError, match="at most 26 experts"):
        chosen_expert("A", 27, rng)


def test_routing_question_and_router_set() -> None:
    question = routing_question("What colour is it?", ["ImageNet-R", "ArxivQA"])
    assert "A. the expert for ImageNet-R\nB. the expert for ArxivQA" in question
    assert "Question: What colour is it?" in question
    tasks = [(name, [Sample(f"{name}{i}", ((f"q{i}", "a"),)) for i in range(5)])
             for name in ("R", "A")]
    chosen = router_samples(tasks, 2, seed=0)
    assert [s.answer for s in chosen] == ["A", "A", "B", "B"]
    original = {f"router:{name}:{s.id}": s.question for name, samples in tasks for s in samples}
    assert all(s.question == routing_question(original[s.id], ["R", "A"]) for s in chosen)
    assert chosen == router_samples(tasks, 2, seed=0)  # seeded
    assert len(router_samples(tasks, 9, seed=0)) == 10  # at most all of a task's samples


# -- options -------------------------------------------------------------------------------------
def test_bad_options_are_clear_errors(tiny_llava, ucit_root, tmp_path) -> None:
    ctx = make_context("mr_lora", tiny_llava, ucit_root, tmp_path)
    for given, message in [({"rank": 0}, "method.rank=0"),
                           ({"router_samples": 0}, "method.router_samples=0"),
                           ({"router_lr": 0}, "method.router_lr=0"),
                           ({"router_epochs": -1}, "method.router_epochs=-1"),
                           ({"router_max_new_tokens": 0}, "method.router_max_new_tokens=0")]:
        with pytest.raises(CLBenchError, match=message):
            MRLoRA(parse_options(MRLoRA, given), ctx)


# -- through the hooks ---------------------------------------------------------------------------
def prompts_of(ucit_root, task: str, n: int = 2) -> list:
    folder = ucit_root / "UCIT" / task
    samples = load_samples(folder / "test.json", ucit_root / "UCIT" / "datasets")[:n]
    return [(s.question, load_image(s.image)) for s in samples]


def two_experts(tiny_llava, ucit_root, tmp_path, **options) -> tuple[MRLoRA, torch.nn.Module]:
    ctx = make_context("mr_lora", tiny_llava, ucit_root, tmp_path)
    method = MRLoRA(MRLoRAOptions(**{"router_epochs": 2.0, "router_lr": 1e-2, **options}), ctx)
    start = projector_weights(ctx.bundle.model)
    model = ctx.bundle.model
    for index, task in enumerate(["ImageNet-R", "ArxivQA"], start=1):
        model = method.before_stage(model, stage(index, task))
        now = projector_weights(model)
        assert all(torch.equal(now[n], start[n]) for n in start)  # each expert from the start
        trained_like(model, index)
        model = method.after_stage(model, stage(index, task))
    return method, model


def expert_model(plain: torch.nn.Module, expert) -> torch.nn.Module:
    """The starting model with one expert's LoRA merged and its projector."""
    model = copy.deepcopy(plain)
    set_projector_weights(model, expert.projector)
    with torch.no_grad():
        for name, f in expert.lora.items():
            model.get_submodule(name).weight += f.product()
    return model


def test_each_sample_runs_on_the_expert_the_router_chose(
    tiny_llava, ucit_root, tmp_path, monkeypatch
) -> None:
    method, plain = two_experts(tiny_llava, ucit_root, tmp_path)
    assert [e.name for e in method.experts] == ["ImageNet-R", "ArxivQA"]
    start = method.start_projector
    assert all(torch.equal(p, start[n]) for n, p in projector_weights(plain).items())
    routed = method.eval_model(plain)
    prompts = prompts_of(ucit_root, "ImageNet-R", 1) + [("What is 2 + 2?", None)] + \
        prompts_of(ucit_root, "ArxivQA", 1)
    asked = []

    def router_answers(model, bundle, questions, *args, **kwargs):
        asked.extend(q for q, _ in questions)
        # the router pass runs on the router expert: its own LoRA and projector
        assert method.routing.weights[:, 2].tolist() == [1.0, 1.0, 1.0]
        assert method.image_routing.weights.shape == (2, 3)
        return ["B", "A", "?!"]  # the third is invalid: a seeded random expert

    monkeypatch.setattr(mr_lora_method, "generate_texts", router_answers)
    method.before_generate(routed, prompts, "mixed")
    fallback = random.Random(0).randrange(2)
    assert asked[0] == routing_question(prompts[0][0], ["ImageNet-R", "ArxivQA"])
    chosen = [1, 0, fallback]
    assert method.routing.weights.argmax(1).tolist() == chosen
    assert method.image_routing.weights.argmax(1).tolist() == [1, fallback]  # rows with images
    bundle = method.context.bundle
    with torch.no_grad():
        for row, (question, image) in enumerate(prompts):
            method._select(routed, [chosen[row]], [(question, image)])
            batch = collate_batch([prompt_item(bundle, question, image)], bundle)
            want = expert_model(plain, method.experts[chosen[row]])(**batch).logits
            assert torch.allclose(routed(**batch).logits, want, atol=1e-4), row
    info = method.after_evaluation(stage(2, "ArxivQA"))
    assert info["router_fallbacks"] == 1 and info["experts"] == 2


def letter_margins(method: MRLoRA, routed: torch.nn.Module) -> list[tuple[str, float]]:
    """For each router-set sample: its expert letter and logit(A) - logit(B) where it is due."""
    learned = [(t.name, method.training_samples(t)) for t in method.tasks]
    samples = router_samples(learned, 8, method.context.config.seed)
    bundle = method.context.bundle
    a, b = bundle.tokenizer.convert_tokens_to_ids(["A", "B"])
    data = ConversationDataset(samples, bundle, 512)
    margins = []
    with torch.no_grad():
        for sample, item in zip(samples, data, strict=True):
            batch = collate_batch([item], bundle)
            labels = batch.pop("labels")[0]
            method._select(routed, [2], [(sample.question, sample.image)])
            logits = routed(**batch).logits[0]
            due = int((labels == (a if sample.answer == "A" else b)).nonzero()[0])
            margins.append((sample.answer, (logits[due - 1, a] - logits[due - 1, b]).item()))
    return margins


def test_router_training_teaches_each_task_expert_letter(tiny_llava, ucit_root, tmp_path) -> None:
    """Measured on the model: after router training every routing question scores its own
    expert's letter above the other's."""
    method, plain = two_experts(tiny_llava, ucit_root, tmp_path, router_lr=1e-12, rank=8)
    before = letter_margins(method, method.eval_model(plain))
    method.options = dataclasses.replace(method.options, router_lr=1e-2, router_epochs=100.0)
    method.router = method.train_router(plain, 3)
    after = letter_margins(method, method.eval_model(plain))
    assert all((margin > 0) == (letter == "A") for letter, margin in after), after
    # the mean margin towards the right letter: about 0 untrained, above 1 after (3 sessions)
    assert toward_right(after) > toward_right(before) + 0.5, (before, after)


def toward_right(margins: list[tuple[str, float]]) -> float:
    return sum(m if letter == "A" else -m for letter, m in margins) / len(margins)


def test_the_router_is_fine_tuned_from_the_last_one(tiny_llava, ucit_root, tmp_path) -> None:
    method, plain = two_experts(tiny_llava, ucit_root, tmp_path, router_lr=1e-12)
    last = method.router
    with torch.no_grad():
        for f in last.lora.values():
            f.B.normal_()
    again = method.train_router(plain, 3)
    assert all(torch.allclose(again.lora[n].B, f.B, atol=1e-6) for n, f in last.lora.items())
    assert all(torch.allclose(again.projector[n], t) for n, t in last.projector.items())


def test_checkpoints_restore_experts_router_and_tasks(tiny_llava, ucit_root, tmp_path) -> None:
    method, plain = two_experts(tiny_llava, ucit_root, tmp_path)
    method.save(plain, tmp_path / "checkpoint")
    fresh = MRLoRA(MRLoRAOptions(), make_context("mr_lora", tiny_llava, ucit_root, tmp_path))
    fresh.load(tmp_path / "checkpoint")
    assert [s.name for s in fresh.tasks] == ["ImageNet-R", "ArxivQA"]
    for a, b in zip([*method.experts, method.router], [*fresh.experts, fresh.router], strict=True):
        assert a.name == b.name and set(a.lora) == set(b.lora)
        assert all(torch.equal(a.lora[n].B, b.lora[n].B) for n in a.lora)
        assert all(torch.equal(a.projector[n], b.projector[n]) for n in a.projector)


@pytest.mark.slow
def test_end_to_end_run_and_resume(tiny_llava, ucit_root, tmp_path, monkeypatch) -> None:
    from reports.run_folder import read_records

    out, _ = run_and_resume("mr_lora", ucit_root, tiny_llava, tmp_path, monkeypatch,
                            "method.router_lr=0.01")
    last = read_records(out)[-1]["method"]
    assert last["experts"] == 2 and set(last["routing_accuracy"]) == {"ImageNet-R", "ArxivQA"}
    assert last["parameters"]["projectors"] > 0
