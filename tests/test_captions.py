"""Caption scoring that cannot take a run down, tested with real failures: METEOR's Java process
killed, METEOR unable to start again, and no Java on PATH at all (in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pycocoevalcap.meteor import meteor as pycoco_meteor

from tasks import captions
from tasks.captions import CAPTION_METRICS, meteor_scorer, simple_tokenize
from tasks.scoring import score_task

REFS = {
    "c1": ["a red square on a white background", "a red box"],
    "c2": ["a blue circle next to a green square"],
    "c3": ["two dogs playing in the snow", "dogs play in snow"],
}
PREDS = {"c1": "a red square", "c2": "a blue circle", "c3": "two dogs in snow"}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def before():
    """The scores with every metric working; no broken METEOR process is left behind."""
    yield score_task("caption", PREDS, REFS)
    captions._discard_meteor()


def test_a_killed_meteor_process_is_restarted(before) -> None:
    process = meteor_scorer().meteor_p
    process.kill()
    process.wait()
    after = score_task("caption", PREDS, REFS)
    assert after.notes == ()
    assert after.details == pytest.approx(before.details)
    assert meteor_scorer().meteor_p is not process


def test_a_meteor_that_cannot_restart_is_marked_and_left_out(
    before, monkeypatch: pytest.MonkeyPatch
) -> None:
    meteor_scorer().meteor_p.kill()
    monkeypatch.setattr(pycoco_meteor, "METEOR_JAR", "no-such-meteor.jar")  # java exits at once
    result = score_task("caption", PREDS, REFS)
    assert result.details["METEOR"] is None
    others = {k: v for k, v in before.details.items() if k != "METEOR"}
    assert {k: v for k, v in result.details.items() if k != "METEOR"} == pytest.approx(others)
    assert result.score == pytest.approx(sum(others.values()) / 6)
    (failed, gap) = result.notes
    assert failed.startswith("METEOR failed: RuntimeError: METEOR failed twice")
    monkeypatch.undo()
    captions._discard_meteor()
    assert gap == ("caption score = mean of 6 of 7 metrics (METEOR failed): not comparable with "
                   "scores over all seven")


def test_without_java_every_python_metric_still_scores(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    code = (
        "import json\nfrom tasks.scoring import score_task\n"
        f"r = score_task('caption', {PREDS!r}, {REFS!r})\n"
        "print(json.dumps({'score': r.score, 'details': r.details, 'notes': r.notes}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PATH": str(empty)},
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    details = result["details"]
    assert list(details) == list(CAPTION_METRICS) and details["METEOR"] is None
    assert all(details[k] is not None for k in CAPTION_METRICS if k != "METEOR")
    assert details["Bleu_1"] > 50.0  # the predictions are close to the references
    assert result["score"] == pytest.approx(sum(v for v in details.values() if v) / 6)
    tokenizer, meteor, gap = result["notes"]
    assert tokenizer.startswith("the PTB tokenizer failed (FileNotFoundError")
    assert "Python approximation" in tokenizer
    assert meteor.startswith("METEOR failed") and "mean of 6 of 7" in gap


@pytest.mark.parametrize(
    "text, tokens",
    [("A dog's toy, isn't it?", "a dog 's toy is n't it"),
     ("Two dogs -- running (fast).", "two dogs running fast"),
     ("a well-known U.S. brand", "a well-known u.s brand")],
)
def test_the_python_fallback_tokenizer(text: str, tokens: str) -> None:
    assert simple_tokenize(text) == tokens
