"""General benchmarks through lmms-eval: the bridge end to end on local micro tasks (offline),
scores equal to the harness's own scorer, the global-state guard, and the missing-extra error."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from bench_files import write_bench

from cl_bench.config import RunConfig
from cl_bench.errors import CLBenchError
from cl_bench.evaluation.general import metric_table, preserved_global_state, resolve_benchmarks
from tasks.scoring import SCORERS, TaskScore, score_task

ROOT = Path(__file__).resolve().parents[1]
needs_lmms = pytest.mark.skipif(
    __import__("importlib").util.find_spec("lmms_eval") is None,
    reason="lmms-eval (the [lmms] extra) is not installed",
)


# -- pure parts ---------------------------------------------------------------------------------
def test_resolve_benchmarks() -> None:
    assert resolve_benchmarks(None, ("micro_mme", "micro_pope")) == ["micro_mme", "micro_pope"]
    assert resolve_benchmarks([], ("micro_mme",)) == []
    assert resolve_benchmarks(["none"], ("micro_mme",)) == []
    assert resolve_benchmarks(["mme", " pope "], ()) == ["mme", "pope"]


def test_general_option_on_the_command_line() -> None:
    from cl_bench import config
    from cl_bench.cli import general_option

    assert config.resolve(general=general_option("none")).general == []
    assert config.resolve(general=general_option("mme,pope")).general == ["mme", "pope"]
    assert config.resolve(general=general_option(None)).general is None  # the suite's own


def test_metric_table_keeps_numbers_only() -> None:
    results = {"micro_mme": {"alias": "micro_mme", "acc,none": 50.0, "acc_stderr,none": "N/A",
                             "acc_plus,none": float("nan"), "exact,strict": 1}}
    expected = {"micro_mme": {"acc": 50.0, "acc_plus": None, "exact/strict": 1.0}}
    assert metric_table(results) == expected


def test_guard_restores_rng_logging_warnings_and_ranks() -> None:
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    root = logging.getLogger()
    handlers, level, filters = list(root.handlers), root.level, list(warnings.filters)
    named = logging.getLogger("transformers")
    named_level = named.level
    os.environ.pop("RANK", None)
    with preserved_global_state():
        assert os.environ["WORLD_SIZE"] == "1"
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        root.handlers[:] = [logging.StreamHandler()]
        root.setLevel(logging.DEBUG)
        named.setLevel(logging.CRITICAL)
        warnings.simplefilter("ignore")
    assert root.handlers == handlers and root.level == level
    assert named.level == named_level and warnings.filters == filters
    assert "RANK" not in os.environ
    after = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    assert after == (random.random(), float(np.random.rand()), float(torch.rand(1)))


def test_missing_lmms_eval_is_a_clear_error(tmp_path: Path) -> None:
    """Named benchmarks without lmms-eval fail clearly; the suite's own are skipped."""
    script = """
import sys, types
sys.modules["lmms_eval"] = None  # as if the extra were not installed
from cl_bench.config import RunConfig
from cl_bench.evaluation.degradation import prepare
from cl_bench.errors import CLBenchError
from cl_bench.evaluation.general import require_lmms_eval
from tasks.suites.ucit import UCIT_MICRO
try:
    require_lmms_eval(["mme", "pope"])
except CLBenchError as err:
    print("ERROR:", err)
ctx = types.SimpleNamespace(config=RunConfig(probes=False), suite=UCIT_MICRO)
print("DEFAULT:", prepare(ctx, [], []).benchmarks)
try:
    prepare(types.SimpleNamespace(config=RunConfig(general=["mme"], probes=False),
                                  suite=UCIT_MICRO), [], [])
except CLBenchError as err:
    print("NAMED:", err)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("ERROR: general benchmarks mme, pope need lmms-eval")
    assert "pip install 'cl-bench[lmms]'" in lines[0] and "--general none" in lines[0]
    assert lines[1] == "DEFAULT: []"
    assert "general benchmarks skipped: lmms-eval is not installed" in done.stderr
    assert lines[2].startswith("NAMED: general benchmarks mme need lmms-eval")


def read_predictions(folder: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{task}.jsonl").read_text().splitlines()]


def config() -> RunConfig:
    cfg = RunConfig()
    cfg.eval.batch_size, cfg.eval.max_new_tokens = 8, 6
    return cfg


class ScriptedLlava(torch.nn.Module):
    """Answers each prompt with the scripted answer of the question it contains (test double
    for a trained model; tokenisation, batching and decoding stay real)."""

    def __init__(self, bundle, script: dict[str, str]) -> None:
        super().__init__()
        self.bundle, self.script = bundle, script

    def generate(self, input_ids, attention_mask, generation_config, **kwargs):
        tok = self.bundle.tokenizer
        rows = []
        for row in input_ids:
            prompt = tok.decode(row, skip_special_tokens=True)
            answer = next(a for q, a in self.script.items() if q in prompt)
            rows.append(tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id])
        width = max(map(len, rows))
        new = torch.tensor([r + [tok.eos_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def word_overlap(predictions: dict, references: dict, rule: str) -> TaskScore:
    """A quick stand-in for the caption scorer (METEOR starts a JVM: ~13 s a call)."""
    per = {}
    for qid, refs in references.items():
        words = set(predictions[qid].lower().split())
        per[qid] = max(len(words & set(r.lower().split())) / max(len(words), 1) for r in refs)
    return TaskScore(100 * sum(per.values()) / len(per), per, {}, "overlap")


# -- the bridge end to end ------------------------------------------------------------------------
@needs_lmms
def test_bridge_scores_equal_harness_scorer_on_tiny_llava(
    tiny_llava: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cl_bench.evaluation.general import evaluate_general
    from cl_bench.evaluation.generation import generate_texts
    from cl_bench.models.llava import load_llava

    monkeypatch.setitem(SCORERS._items, "caption", word_overlap)
    mme = [(f"Q{i}: Is there a circle? Please answer yes or no.", "Yes" if i % 2 == 0 else "No")
           for i in range(4)]
    pope = {s: [(f"Q{s}{i}: Is there a red circle in the image?", ["yes", "no"][i % 2])
                for i in range(3)] for s in ("random", "popular", "adversarial")}
    open_qs = [("What colour is the circle?", ["red", "the circle is red"], True),
               ("What is a circle?", ["a round shape"], False)]
    bundle = load_llava(tiny_llava)
    said = generate_texts(bundle.model, bundle, [(open_qs[0][0], None)], 1, 48)[0]
    open_qs.append(("What colour is the circle?", [said], False))  # one answer scores (48 new
    # tokens, as micro_open.yaml asks)
    data = write_bench(tmp_path / "data", mme, pope, open_qs)
    out = tmp_path / "out"
    state = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    scores = evaluate_general(bundle.model, bundle, ["micro_mme", "micro_pope", "micro_open"],
                              data, config(), out)
    assert random.getstate() == state[0]
    assert (np.random.get_state()[1] == state[1]).all()
    assert torch.equal(torch.get_rng_state(), state[2])
    assert json.loads((out / "results.json").read_text()) == scores

    rows = {t: read_predictions(out, t) for t in ("micro_mme", "micro_pope", "micro_open")}
    assert len(rows["micro_mme"]) == 4 and len(rows["micro_pope"]) == 9
    assert [r["category"] for r in rows["micro_pope"][:3]] == ["random", "popular", "adversarial"]

    def harness(answer_type: str, items: list[dict]) -> float:
        preds = {r["question_id"]: r["prediction"] for r in items}
        refs = {r["question_id"]: r["references"] for r in items}
        return score_task(answer_type, preds, refs, "exact").score

    assert scores["micro_mme"]["acc"] == pytest.approx(harness("yesno", rows["micro_mme"]))
    assert scores["micro_pope"]["acc"] == pytest.approx(harness("yesno", rows["micro_pope"]))
    for split in ("random", "popular", "adversarial"):
        items = [r for r in rows["micro_pope"] if r["category"] == split]
        assert scores["micro_pope"][f"acc_{split}"] == pytest.approx(harness("yesno", items))
    assert scores["micro_open"]["score"] == pytest.approx(harness("caption", rows["micro_open"]))
    assert scores["micro_open"]["score"] > 0
    words = [len(r["prediction"].split()) for r in rows["micro_open"]]
    assert scores["micro_open"]["words"] == pytest.approx(sum(words) / len(words))


@needs_lmms
def test_bridge_with_scripted_answers_gives_hand_computed_scores(
    tiny_llava: Path, tmp_path: Path
) -> None:
    from cl_bench.evaluation.general import evaluate_general
    from cl_bench.models.llava import load_llava

    # MME: three pairs; the second pair has one wrong answer -> acc 5/6, acc+ 2/3.
    mme = [(f"M{i}: Is there a circle in the image?", ["Yes", "No"][i % 2]) for i in range(6)]
    mme_said = ["Yes", "No.", "Yes", "Yes", "Yes, there is.", "No"]
    refs = ["yes", "yes", "no", "no"]
    said = {"random": ["Yes", "Yes, it is.", "No", "No."],
            "popular": ["Yes", "No", "No", "Yes"],
            "adversarial": ["Yes", "Yes", "Yes", "Yes"]}
    pope = {s: [(f"P{s[0]}{i}: Is there a red circle?", refs[i]) for i in range(4)] for s in said}
    script = {q: a for (q, _), a in zip(mme, mme_said, strict=True)}
    script |= {q: a for s in said for (q, _), a in zip(pope[s], said[s], strict=True)}
    data = write_bench(tmp_path / "data", mme, pope, [("Q?", ["a"], False)])
    bundle = load_llava(tiny_llava)
    out = tmp_path / "out"
    scores = evaluate_general(ScriptedLlava(bundle, script), bundle, ["micro_mme", "micro_pope"],
                              data, config(), out)

    assert scores["micro_mme"] == pytest.approx({"acc": 500 / 6, "acc_plus": 200 / 3})
    pope_scores = scores["micro_pope"]
    expected = {
        "acc_random": 100.0, "acc_popular": 50.0, "acc_adversarial": 50.0, "acc": 800 / 12,
        "f1_random": 100.0, "f1_popular": 50.0, "f1_adversarial": 400 / 6,
        "precision": 62.5, "recall": 500 / 6, "f1": 1000 / 14, "yes_ratio": 800 / 12,
    }
    assert pope_scores == pytest.approx(expected)
    rows = read_predictions(out, "micro_pope")
    preds = {r["question_id"]: r["prediction"] for r in rows}
    assert preds["pope-random-1"] == "Yes, it is."
    harness = score_task("yesno", preds, {r["question_id"]: r["references"] for r in rows})
    assert pope_scores["acc"] == pytest.approx(harness.score)


@needs_lmms
def test_unknown_benchmark_is_named(tiny_llava: Path, tmp_path: Path) -> None:
    from cl_bench.evaluation.general import evaluate_general
    from cl_bench.models.llava import load_llava

    data = write_bench(tmp_path / "data", [("Q?", "Yes")], {"random": [("Q?", "yes")]}, [])
    bundle = load_llava(tiny_llava)
    match = "unknown lmms-eval task 'micro_mmee'. Did you mean 'micro_mme'"
    with pytest.raises(CLBenchError, match=match):
        evaluate_general(bundle.model, bundle, ["micro_mmee"], data, config(), tmp_path / "o")
