"""SEFE / RegLoRA: key elements and the penalty by hand, ASD files, the penalty's effect on a
trained update, checkpoints, options, and end-to-end runs with resume."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from method_kit import make_context, run_and_resume, stage, trained_like

from cl_bench.errors import CLBenchError
from cl_bench.method import parse_options
from cl_bench.models.deltas import stage_delta
from cl_bench.registry import get_method, get_suite
from cl_bench.running.training import train_model
from methods.sefe.method import Sefe, SefeOptions, key_elements, key_penalty, union_keys


# -- the core terms by hand ----------------------------------------------------------------------
def test_key_elements_of_a_toy_update_and_their_union() -> None:
    update = torch.tensor([[3.0, -1.0, 0.5], [6.0, -2.0, 1.0]])
    # the int(1/3 * 6) = 2 largest |entries|: 6 at (1, 0) -> flat 3, 3 at (0, 0) -> flat 0
    keys = key_elements(update, 1 / 3)
    assert keys.tolist() == [0, 3] and keys.dtype == torch.int32
    assert key_elements(update, 0.02).numel() == 0  # int(0.02 * 6) = 0, as the reference
    assert union_keys(None, keys).tolist() == [0, 3]
    assert union_keys(torch.tensor([4, 0], dtype=torch.int32), keys).tolist() == [0, 3, 4]


def test_reglora_penalty_on_a_toy_merged_lora() -> None:
    B = torch.tensor([[1.0], [2.0]])  # 2 x 1
    A = torch.tensor([[3.0, -1.0, 0.5]])  # 1 x 3: B A = [[3, -1, 0.5], [6, -2, 1]]
    keys = torch.tensor([0, 4], dtype=torch.int32)  # (0, 0) and (1, 1), marked by hand
    # lambda * mean(|3|, |-2|) = 2 * 2.5
    assert key_penalty([(A, B)], [keys], 2.0).item() == pytest.approx(5.0)
    B2, A2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 4.0], [1.0, 1.0]])  # B A = [[0, 4]]
    # two weights: the mean of their means, (2.5 + |4|) / 2, times lambda = 1
    both = key_penalty([(A, B), (A2, B2)], [keys, torch.tensor([1], dtype=torch.int32)], 1.0)
    assert both.item() == pytest.approx(3.25)
    A.requires_grad_(True)
    key_penalty([(A, B)], [keys], 2.0).backward()
    # d/dA of 2 * (|1 * A00| + |2 * A01|) / 2 = (sign(3) * 1, sign(-2) * 2, 0)
    assert A.grad.tolist() == [[1.0, -2.0, 0.0]]


# -- options and data ----------------------------------------------------------------------------
def sefe(tiny_llava, root, tmp_path, **options) -> Sefe:
    return Sefe(SefeOptions(**options), make_context("sefe", tiny_llava, root, tmp_path))


def test_bad_options_and_missing_asd_files_fail_before_training(
    tiny_llava, ucit_root, tmp_path
) -> None:
    ctx = make_context("sefe", tiny_llava, ucit_root, tmp_path)
    for given, message in [({"reg_weight": -1}, "method.reg_weight=-1"),
                           ({"key_fraction": 0}, "method.key_fraction=0"),
                           ({"key_fraction": 1.5}, "method.key_fraction=1.5"),
                           ({"asd_file": " "}, "method.asd_file")]:
        with pytest.raises(CLBenchError, match=message):
            Sefe(parse_options(Sefe, given), ctx)
    tasks = [get_suite("ucit").task("ImageNet-R")]
    expected = ucit_root / "UCIT" / "ImageNet-R" / "train_x30.json"  # the fixture has x20 only
    with pytest.raises(CLBenchError, match=f"missing: {expected}.*run reglora"):
        Sefe(SefeOptions(asd_file="train_x30.json"), ctx).plan(tasks)
    assert len(Sefe(SefeOptions(asd=False), ctx).plan(tasks)) == 1
    assert get_method("reglora").options({}).asd is False


ASD_STYLES = [  # one record of each answer style (hand-written test data, not a conversion rule)
    ("Is the square red?", "No"),
    ("What colour is the square?\nA. red\nB. green\nC. blue", "B"),
    ("What colour is the square? Answer briefly.", "green"),
    ("Why is the square green? Explain briefly.", "The square is filled with green."),
]


@pytest.fixture(scope="module")
def asd_root(ucit_root, tmp_path_factory):
    """A copy of the UCIT fixture with a train_x20.json (answer styles) beside each train file."""
    root = tmp_path_factory.mktemp("asd") / "data"
    shutil.copytree(ucit_root, root)
    for folder in (root / "UCIT").iterdir():
        if (folder / "train.json").is_file():
            records = json.loads((folder / "train.json").read_text())
            for record, (question, answer) in zip(records, ASD_STYLES, strict=False):
                record["conversations"] = [{"from": "human", "value": f"<image>\n{question}"},
                                           {"from": "gpt", "value": answer}]
            (folder / "train_x20.json").write_text(json.dumps(records))
    return root


def test_asd_files_are_the_training_data(tiny_llava, asd_root, tmp_path) -> None:
    method = sefe(tiny_llava, asd_root, tmp_path)
    assert len(method.plan([get_suite("ucit").task("ArxivQA")])) == 1
    samples = method.training_samples(stage(1, "ArxivQA"))
    assert [s.answer for s in samples[:4]] == [a for _, a in ASD_STYLES] and len(samples) == 8
    plain = sefe(tiny_llava, asd_root, tmp_path, asd=False).training_samples(stage(1, "ArxivQA"))
    assert plain[0].answer != "No"


# -- through the hooks ---------------------------------------------------------------------------
def keys_after_one_stage(method: Sefe) -> torch.nn.Module:
    model = method.before_stage(method.context.bundle.model, stage(1, "ImageNet-R"))
    trained_like(model, 1)
    factors = stage_delta(model, {}).lora
    model = method.after_stage(model, stage(1, "ImageNet-R"))
    for name, f in factors.items():  # 2 % of each update, the largest |B A| entries
        update = (f.B @ f.A).abs().flatten()
        keys = method.keys[name].long()
        assert keys.numel() == int(0.02 * update.numel())
        assert update[keys].min() >= torch.topk(update, keys.numel()).values[-1]
    return model


def test_the_penalty_keeps_earlier_key_elements_of_a_trained_update_small(
    tiny_llava, ucit_root, tmp_path
) -> None:
    """Train stage 2 for real with and without RegLoRA; the key entries of its update shrink."""
    ratios = {}
    for weight in (0.0, 2500.0):
        method = sefe(tiny_llava, ucit_root, tmp_path / str(weight), asd=False, reg_weight=weight)
        model = keys_after_one_stage(method)
        model = method.before_stage(model, stage(2, "ArxivQA"))
        cfg = dataclasses.replace(method.context.config.train, max_steps=8, learning_rate=0.01,
                                  batch_size=4)
        samples = method.training_samples(stage(2, "ArxivQA"))
        info = train_model(model, method.context.bundle, samples, cfg, tmp_path / "trainer", 0,
                           method.extra_losses)
        assert ("reglora" in info) == (weight > 0)
        keys, others = [], []
        for name, f in stage_delta(model, {}).lora.items():
            update = (f.B @ f.A).abs().flatten()
            mask = torch.zeros_like(update, dtype=torch.bool)
            mask[method.keys[name].long()] = True
            keys.append(update[mask])
            others.append(update[~mask])
        ratios[weight] = (torch.cat(keys).mean() / torch.cat(others).mean()).item()
    assert ratios[2500.0] < 0.5 * ratios[0.0], ratios


def test_checkpoints_restore_the_key_elements(tiny_llava, ucit_root, tmp_path) -> None:
    method = sefe(tiny_llava, ucit_root, tmp_path, asd=False)
    model = keys_after_one_stage(method)
    method.save(model, tmp_path / "checkpoint")
    fresh = sefe(tiny_llava, ucit_root, tmp_path, asd=False)
    fresh.load(tmp_path / "checkpoint")
    assert set(fresh.keys) == set(method.keys)
    assert all(torch.equal(fresh.keys[n], method.keys[n]) for n in method.keys)
    assert method.after_evaluation(stage(1, "ImageNet-R"))["key_elements"] == sum(
        int(k.numel()) for k in method.keys.values())
    (tmp_path / "checkpoint" / "reglora_keys.safetensors").unlink()
    with pytest.raises(CLBenchError, match="RegLoRA key elements cannot be restored"):
        sefe(tiny_llava, ucit_root, tmp_path, asd=False).load(tmp_path / "checkpoint")


@pytest.mark.slow
def test_end_to_end_run_and_resume(tiny_llava, ucit_root, tmp_path, monkeypatch):
    """RegLoRA's key elements survive a resume (sefe's ASD data: the quick run over the registry
    and test_method_effects_routed.py)."""
    from reports.run_folder import read_records

    # the quick run's 3 steps, not 2: the first step's lr is 0 (warm-up), leaving B A = 0
    out, _ = run_and_resume("reglora", ucit_root, tiny_llava, tmp_path / "reglora", monkeypatch)
    records = read_records(out)
    assert "reglora" not in records[1]["train"] and records[2]["train"]["reglora"] > 0
    assert records[-1]["method"]["key_elements"] > 0
