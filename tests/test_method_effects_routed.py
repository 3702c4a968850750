"""The defining effect of the prompt, mixture, subspace, expert and patch methods, measured on the
model their hooks leave behind, with each method's own defaults (built from its registered name on
the fixture suite, which supplies the default encoder and SEFE's ASD files): L2P, MoELoRA,
ModalPrompt, DISCO, SEFE, MR-LoRA and Model Tailor. Hand computations of the core terms on toy
inputs are in each method's own test file; these check that the method applies them, with the
paper's defaults, to the right parts of the model."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from fixture_suite import NAME, fixture_suite
from method_kit import RANK, batch_of, make_method, stage

import methods.mr_lora.method as mr_lora_method
from cl_bench.models.backbones import backbone_of
from cl_bench.models.batching import collate_batch, prompt_item
from cl_bench.models.deltas import PEFT_PREFIX, stage_delta
from cl_bench.models.llava import load_image
from cl_bench.models.lora import projector_weights, set_projector_weights
from cl_bench.models.moe_lora import expert_layers
from cl_bench.models.prompting import language_model
from methods.model_tailor.calibration import calibration_batches, layer_hessians
from methods.model_tailor.method import lora_layers
from methods.model_tailor.tailoring import tailor_weight
from tasks.loaders import load_samples
from tasks.suites.ucit import UCIT

cosine = torch.nn.functional.cosine_similarity


@pytest.fixture(autouse=True)
def suite_cache(tmp_path: Path, monkeypatch) -> None:
    """The fixture suite, its default encoder built in this test's cache."""
    fixture_suite()
    monkeypatch.setenv("CLBENCH_CACHE", str(tmp_path / "cache"))


def nudge(model: torch.nn.Module, seed: int, scale: float = 0.5) -> None:
    """Stand-in for training: every trainable parameter moved by seeded noise."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen))


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor],
                        but: str | None = None) -> None:
    """``model`` has exactly the parameters ``expected``, equal but for names containing ``but``
    (which must differ)."""
    now = dict(model.named_parameters())
    assert set(now) == set(expected)
    for name, value in expected.items():
        assert torch.equal(now[name], value) != (but is not None and but in name), name


def prompts_of(method, letter: str, n: int = 4) -> list[tuple[str, object]]:
    (task,) = UCIT.resolve_order(letter)
    return [(s.question, load_image(s.image)) for s in method.context.train_samples(task)[:n]]


def decoder_inputs(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The embeddings the decoder stack reads for ``batch`` (prompts inserted)."""
    seen = []
    handle = language_model(model).register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].detach().clone()),
        with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    return seen[0]


def generation_batch(method, prompts) -> dict:
    bundle = method.context.bundle
    return collate_batch([prompt_item(bundle, q, image) for q, image in prompts], bundle,
                         left_pad=True)


def after_bos(embeds: torch.Tensor, batch: dict, length: int) -> torch.Tensor:
    """Each row's ``length`` positions right after its BOS (its first attended token)."""
    start = (batch["attention_mask"].cumsum(1) == 0).sum(1) + 1
    return torch.stack([embeds[r, s : s + length] for r, s in enumerate(start.tolist())])


# -- L2P -----------------------------------------------------------------------------------------
def test_l2p_inserts_the_key_nearest_prompts_of_its_pool_after_bos(
    tiny_llava: Path, ucit_root: Path, tmp_path: Path
) -> None:
    """L2P eq. 2-3, 5 with sec. 5.2's M = 10, N = 5, L_p = 5, lambda = 0.5: the query is the
    frozen vision tower's [CLS] feature; only the pool trains; the LLaVA is left as it was."""
    l2p = make_method("l2p", tiny_llava, ucit_root, tmp_path, suite=NAME)
    start = weights(l2p.context.bundle.model)
    at = stage(1, "R")
    model = l2p.before_stage(l2p.context.bundle.model, at)
    pool = l2p.pool
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "input_prompts.prompts", "input_prompts.keys"}
    assert pool.prompts.shape[:2] == (10, 5)
    nudge(model, 1, 0.05)
    batch = batch_of(l2p, at)
    l2p.before_train_batch(model, prompts_of(l2p, "R"))
    embeds = decoder_inputs(model, batch)
    with torch.no_grad():
        tower = l2p.context.bundle.backbone.vision_tower(model)
        queries = tower(pixel_values=batch["pixel_values"]).pooler_output
    sims = cosine(queries.unsqueeze(1), pool.keys.unsqueeze(0), dim=-1)
    best, index = sims.topk(5, dim=1)
    assert torch.allclose(after_bos(embeds, batch, 25), pool.prompts[index].flatten(1, 2))
    outputs = model(**batch)
    key_loss = l2p.extra_losses(model, batch, outputs)["l2p_keys"]
    assert key_loss.item() == pytest.approx(0.5 * (1 - best).sum(1).mean().item(), rel=1e-5)
    plain = l2p.after_stage(model, at)
    assert_same_weights(plain, start)


# -- MoELoRA -------------------------------------------------------------------------------------
def test_moelora_mixes_experts_of_rank_3_per_token_and_trains_them_on(
    tiny_llava: Path, ucit_root: Path, tmp_path: Path
) -> None:
    """CoIN's MoELoRA with MCITlib's UCIT defaults: E = one expert per stage, rank 3 each,
    alpha = 2 r; h = W x + (alpha / r) sum_e softmax(W_g x)_e B_e A_e x; nothing merged, the next
    stage trains the same experts on."""
    moe = make_method("moelora", tiny_llava, ucit_root, tmp_path, suite=NAME)
    stages = moe.plan(UCIT.resolve_order("RAV"))
    model = moe.before_stage(moe.context.bundle.model, stages[0])
    layers = expert_layers(model)
    assert len(layers) >= 2 * 7  # every targeted linear layer of both decoder layers
    nudge(model, 1, 0.05)
    x = torch.randn(2, 5, next(iter(layers.values())).base.in_features)
    for layer in layers.values():
        assert layer.A.shape[0] == 9 and layer.scaling == 2.0
        if layer.base.in_features != x.shape[-1]:
            continue
        gates = torch.softmax(x @ layer.router.T, dim=-1)
        routed = sum(gates[..., e : e + 1] * (x @ layer.A[3 * e : 3 * e + 3].T)
                     @ layer.B[:, 3 * e : 3 * e + 3].T for e in range(3))
        with torch.no_grad():
            assert torch.allclose(layer(x), layer.base(x) + 2.0 * routed, atol=1e-5)
    trained = {n: (layer, layer.B.detach().clone()) for n, layer in layers.items()}
    model = moe.before_stage(moe.after_stage(model, stages[0]), stages[1])
    for name, layer in expert_layers(model).items():
        assert layer is trained[name][0] and torch.equal(layer.B, trained[name][1])
        assert layer.B.requires_grad and layer.router.requires_grad


# -- ModalPrompt ---------------------------------------------------------------------------------
def test_modalprompt_chooses_prompts_by_image_and_text_prototype_similarity(
    tiny_llava: Path, ucit_root: Path, tmp_path: Path
) -> None:
    """ModalPrompt's defaults (official code): 10-token prompts, top 3, lambda = 0.5. Training
    inserts the 2 earlier prompts nearest the sample and then the current one, with the alignment
    loss; evaluation the 3 nearest of all, least similar first; the LLaVA stays as it was."""
    mp = make_method("modalprompt", tiny_llava, ucit_root, tmp_path, suite=NAME)
    start = weights(mp.context.bundle.model)
    model = mp.context.bundle.model
    for index, letter in enumerate("RAV", start=1):
        model = mp.before_stage(model, stage(index, letter))
        model = mp.after_stage(model, stage(index, letter))
    assert_same_weights(model, start)
    prompts = prompts_of(mp, "R", 2) + prompts_of(mp, "A", 2)
    images = mp.encoder.image_features([image for _, image in prompts])
    texts = mp.encoder.text_features([question for question, _ in prompts])

    def guidance() -> torch.Tensor:
        protos = torch.stack([t(p).mean(0) for t, p in zip(mp.prompts.transforms,
                                                             mp.prompts.prompts, strict=True)])
        return (0.5 * cosine(images.unsqueeze(1), protos, dim=-1)
                + 0.5 * cosine(texts.unsqueeze(1), protos, dim=-1)).detach()

    def inserted(chosen: torch.Tensor) -> torch.Tensor:
        return torch.stack(list(mp.prompts.prompts))[chosen].flatten(1, 2).detach()

    at = stage(4, "C")
    model = mp.before_stage(model, at)
    assert all(p.shape[0] == 10 for p in mp.prompts.prompts)
    batch = collate_batch([prompt_item(mp.context.bundle, q, image) for q, image in prompts],
                          mp.context.bundle)  # right-padded, as in training
    model.train()  # as the Trainer does
    mp.before_train_batch(model, prompts)
    earlier = guidance()[:, :3].topk(2, dim=1).indices.flip(1)
    chosen = torch.cat([earlier, torch.full((4, 1), 3)], dim=1)
    assert torch.allclose(after_bos(decoder_inputs(model, batch), batch, 30), inserted(chosen))
    proto = mp.prompts.transforms[3](mp.prompts.prompts[3]).mean(0)
    alignment = (1 - cosine(images, proto.unsqueeze(0), dim=-1).mean()
                 + 1 - cosine(texts, proto.unsqueeze(0), dim=-1).mean())
    loss = mp.extra_losses(model, batch, None)["modalprompt_alignment"]
    assert loss.item() == pytest.approx(alignment.item(), rel=1e-5)
    model = mp.after_stage(model.eval(), at)
    evaluated = mp.eval_model(model)
    mp.before_generate(evaluated, prompts, "mixed")
    batch = generation_batch(mp, prompts)
    chosen = guidance().topk(3, dim=1).indices.flip(1)
    assert torch.allclose(after_bos(decoder_inputs(evaluated, batch), batch, 30),
                          inserted(chosen))


# -- DISCO ---------------------------------------------------------------------------------------
def test_disco_activates_one_subspace_per_stage_by_instruction_similarity(
    tiny_llava: Path, ucit_root: Path, tmp_path: Path
) -> None:
    """DISCO's defaults (MCITlib UCIT): a new subspace every stage (no matching threshold), of the
    run's LoRA rank; SSA alpha = softmax(cos(instruction feature, identity token) / 0.05); the
    routed model is the starting model plus sum_i alpha_i B_i A_i for each sample."""
    disco = make_method("disco", tiny_llava, ucit_root, tmp_path, suite=NAME)
    model = disco.context.bundle.model
    start = weights(model)
    updates = []
    for index, letter in enumerate("RAR", start=1):  # ImageNet-R twice: still a new subspace
        model = disco.before_stage(model, stage(index, letter))
        nudge(model, index)
        updates.append({n: f.product() for n, f in stage_delta(model, {}).lora.items()})
        model = disco.after_stage(model, stage(index, letter))
    assert_same_weights(model, start, but="multi_modal_projector")  # shared, trained on
    assert [s.tasks for s in disco.subspaces] == [["ImageNet-R"], ["ArxivQA"], ["ImageNet-R"]]
    assert all(f.A.shape[0] == RANK for s in disco.subspaces for f in s.lora.values())
    tokens = []
    for letter in "RAR":
        (task,) = UCIT.resolve_order(letter)
        questions = [s.question for s in disco.context.train_samples(task)]
        tokens.append(disco.encoder.text_features(questions).mean(0))
    for subspace, token in zip(disco.subspaces, tokens, strict=True):
        assert torch.allclose(subspace.token, token, atol=1e-5)
    prompts = prompts_of(disco, "A", 1) + prompts_of(disco, "R", 1)
    routed = disco.eval_model(model)
    disco.before_generate(routed, prompts, "mixed")
    features = disco.encoder.text_features([q for q, _ in prompts])
    alpha = torch.softmax(cosine(features.unsqueeze(1), torch.stack(tokens), dim=-1) / 0.05, -1)
    assert torch.allclose(disco.routing.weights, alpha, atol=1e-5)
    assert alpha[0].argmax() == 1 and alpha[1, 1] < 0.5
    batch = generation_batch(disco, prompts)
    mixed = copy.deepcopy(model)
    with torch.no_grad():
        for name in updates[0]:
            mixed.get_submodule(name).weight += sum(a * u[name] for a, u in zip(
                alpha[0].tolist(), updates, strict=True))
        first = {k: v[:1] for k, v in batch.items()}
        assert torch.allclose(routed(**batch).logits[0], mixed(**first).logits[0], atol=1e-4)


# -- SEFE ----------------------------------------------------------------------------------------
def test_sefe_trains_on_asd_data_and_penalises_the_earlier_key_elements(
    tiny_llava: Path, ucit_root: Path, tmp_path: Path
) -> None:
    """SEFE's defaults: the ASD file train_x20.json is the training data; after a stage the 2 %
    largest |B A| entries of each adapted weight are key elements and the LoRA is merged; the next
    stage's loss adds 2500 * the mean over weights of mean |(B A)[keys]|."""
    sefe = make_method("sefe", tiny_llava, ucit_root, tmp_path, suite=NAME)
    tasks = UCIT.resolve_order("RA")
    assert len(sefe.plan(tasks)) == 2
    files = UCIT.task_files(tasks[0], ucit_root)
    first = stage(1, "R")
    samples = sefe.training_samples(first)
    assert samples == load_samples(files.train.parent / "train_x20.json", files.image_root)
    assert samples != sefe.context.train_samples(tasks[0])
    base = weights(sefe.context.bundle.model)
    model = sefe.before_stage(sefe.context.bundle.model, first)
    nudge(model, 1)
    factors = stage_delta(model, {}).lora
    plain = sefe.after_stage(model, first)
    params = dict(plain.named_parameters())
    keys = {}
    for name, f in factors.items():
        update = (f.B @ f.A).abs().flatten()
        keys[name] = update.topk(int(0.02 * update.numel())).indices
        assert sorted(sefe.keys[name].tolist()) == sorted(keys[name].tolist()), name
        merged = base[f"{name}.weight"] + f.product()
        assert torch.allclose(params[f"{name}.weight"], merged, atol=1e-5), name
    second = stage(2, "A")
    model = sefe.before_stage(plain, second)
    nudge(model, 2)
    means = []
    for name, idx in keys.items():
        module = model.get_submodule(PEFT_PREFIX + name)
        update = module.lora_B["default"].weight @ module.lora_A["default"].weight
        means.append(update.flatten()[idx].abs().mean())
    penalty = sefe.extra_losses(model, batch_of(sefe, second), None)["reglora"]
    assert penalty.item() == pytest.approx(2500 * torch.stack(means).mean().item(), rel=1e-5)


# -- MR-LoRA -------------------------------------------------------------------------------------
def test_mr_lora_isolates_experts_and_routes_each_sample_by_its_router(
    tiny_llava: Path, ucit_root: Path, tmp_path: Path, monkeypatch
) -> None:
    """MR-LoRA's defaults (reference scripts): each expert trains from the starting model and
    projector; the router LoRA trains after each stage on up to 20 samples of every learned task,
    at lr 5e-6 for 40 epochs; at inference the router answers in up to 16 tokens and each sample
    runs on the expert its answer names (its LoRA and its projector)."""
    mr = make_method("mr_lora", tiny_llava, ucit_root, tmp_path, suite=NAME)
    real_train = mr_lora_method.train_model
    router_runs = []

    def recording_train(model, bundle, samples, cfg, *args, **kwargs):
        router_runs.append((samples, cfg))
        return real_train(model, bundle, samples, cfg, *args, **kwargs)

    monkeypatch.setattr(mr_lora_method, "train_model", recording_train)
    model = mr.context.bundle.model
    start = weights(model)
    experts = []
    for index, letter in enumerate("RA", start=1):
        model = mr.before_stage(model, stage(index, letter))
        nudge(model, index, 0.05)
        experts.append(({n: f.product() for n, f in stage_delta(model, {}).lora.items()},
                        projector_weights(model)))
        model = mr.after_stage(model, stage(index, letter))
        assert_same_weights(model, start)  # the next expert starts from the starting model
    samples, cfg = router_runs[-1]
    assert [s.answer for s in samples] == ["A"] * 8 + ["B"] * 8  # min(20, 8) of each task
    assert (cfg.learning_rate, cfg.epochs) == (5e-6, 40.0)
    routed = mr.eval_model(model)
    prompts = prompts_of(mr, "R", 1) + prompts_of(mr, "A", 1)
    asked = []

    def router_answers(model_, bundle, questions, batch_size, max_new_tokens, *args):
        asked.append(max_new_tokens)
        assert mr.routing.weights.argmax(1).tolist() == [2, 2]  # the router's own LoRA
        return ["B", "A"]

    monkeypatch.setattr(mr_lora_method, "generate_texts", router_answers)
    mr.before_generate(routed, prompts, "mixed")
    assert asked == [16] and mr.routing.weights.argmax(1).tolist() == [1, 0]
    batch = generation_batch(mr, prompts)
    with torch.no_grad():
        got = routed(**batch).logits
        for row, chosen in enumerate([1, 0]):
            update, weights_of_projector = experts[chosen]
            expert = copy.deepcopy(model)
            set_projector_weights(expert, weights_of_projector)
            for name, u in update.items():
                expert.get_submodule(name).weight += u
            one = {k: v[row : row + 1] for k, v in batch.items()}
            assert torch.allclose(got[row], expert(**one).logits[0], atol=1e-4), row


# -- Model Tailor --------------------------------------------------------------------------------
def test_model_tailor_keeps_a_compensated_tenth_of_each_update(
    tiny_llava: Path, ucit_root: Path, tmp_path: Path
) -> None:
    """Model Tailor's defaults (reference main_model_tailor.py / sparsegpt.py): each adapted
    weight of the bottom layer is the patch of the fine-tuned weight (sparsity 0.9, salience
    weight 0.8, blocks of 128 columns, damping 0.01, the reference's compensation sign) on the
    Hessian of 128 calibration conversations of the task; the projector and every other weight
    are as before the stage."""
    mt = make_method("model_tailor", tiny_llava, ucit_root, tmp_path, suite=NAME)
    start = weights(mt.context.bundle.model)
    at = stage(1, "R")
    model = mt.before_stage(mt.context.bundle.model, at).eval()
    nudge(model, 1)
    adapted = {f"{n.removeprefix(PEFT_PREFIX)}.weight" for n, m in model.named_modules()
               if hasattr(m, "lora_A") and "default" in m.lora_A}
    ctx = mt.context
    bottom = backbone_of(model).decoder_layers(model)[0]
    prefix = next(n for n, m in model.named_modules() if m is bottom).removeprefix(PEFT_PREFIX)
    targets = lora_layers(bottom)
    batches = calibration_batches(ctx.bundle, mt.training_samples(at), 128, 8,
                                  ctx.config.train.max_length, ctx.config.seed + 1)
    hessians = layer_hessians(model, bottom, targets, batches)
    expected = {}
    for name, module in targets.items():
        before = module.base_layer.weight.detach()
        tuned = before + module.scaling["default"] * (
            module.lora_B["default"].weight @ module.lora_A["default"].weight).detach()
        expected[f"{prefix}.{name}.weight"] = tailor_weight(tuned, before, hessians[name], 0.9,
                                                            0.8, 128, 0.01, "reference")
    params = dict(mt.after_stage(model, at).named_parameters())
    assert set(params) == set(start) and len(expected) >= 7
    for name, value in expected.items():
        assert torch.allclose(params[name], value, atol=1e-5), name
    for name in adapted:  # a patch of at most a tenth of each weight's entries
        assert 0.05 < (params[name] != start[name]).float().mean() <= 0.1 + 1e-9, name
    for name, value in start.items():  # the projector reverted, nothing else touched
        if name not in adapted:
            assert torch.equal(params[name], value), name
