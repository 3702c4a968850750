"""The stage-0 scores of a micro base model: what stage 0 of a ``ucit-micro`` run must show."""

from __future__ import annotations

from pathlib import Path

from cl_bench.config import EvalConfig, resolve
from cl_bench.evaluation.generation import evaluate_task, generate_answers
from cl_bench.models.llava import ModelBundle, load_llava
from cl_bench.registry import get_suite
from tasks.loaders import load_samples, load_test_samples
from tasks.scoring import score_task

BENCH = "general/bench"
YES_NO_BENCHMARKS = {
    "micro_mme": ("mme.json",),
    "micro_pope": ("pope_random.json", "pope_popular.json", "pope_adversarial.json"),
}
OPEN_TOKENS = 48  # as micro_open.yaml


def stage0_scores(model_dir: Path, data: Path, suite_name: str = "ucit-micro") -> dict[str, float]:
    """Each task's test score with the suite's default evaluation settings, then the general
    scores (``general_scores``)."""
    suite = get_suite(suite_name)
    eval_cfg = resolve(None, [], lambda name: suite.defaults, suite=suite_name).eval
    bundle = load_llava(model_dir)
    scores = {}
    for task in suite.tasks:
        samples = load_test_samples(suite.task_files(task, data))
        result = evaluate_task(bundle.model, bundle, task.name, task.answer_type, samples,
                               eval_cfg.batch_size, eval_cfg.max_new_tokens, eval_cfg.rule)
        scores[task.name] = result.score.score
    return scores | general_scores(bundle, data, eval_cfg)


def general_scores(bundle: ModelBundle, data: Path, eval_cfg: EvalConfig) -> dict[str, float]:
    """Yes/no accuracy on micro MME and on micro POPE (its three splits together), scored as the
    micro lmms-eval tasks score them, and the mean words of the answers to micro open."""
    scores = {}
    for name, files in YES_NO_BENCHMARKS.items():
        samples = [s for f in files for s in load_samples(data / BENCH / f, data / "general")]
        answers = generate_answers(bundle.model, bundle, samples, eval_cfg.batch_size,
                                   eval_cfg.max_new_tokens, name)
        references = {s.id: list(s.references) for s in samples}
        scores[f"{name}_acc"] = score_task("yesno", answers, references, eval_cfg.rule).score
    samples = load_samples(data / BENCH / "open.json", data / "general")
    answers = generate_answers(bundle.model, bundle, samples, eval_cfg.batch_size, OPEN_TOKENS,
                               "micro_open")
    scores["micro_open_words"] = sum(len(a.split()) for a in answers.values()) / len(answers)
    return scores
