"""The COCO caption metrics (pycocoevalcap), made so that they cannot take a run down.

pycocoevalcap tokenises with Stanford's PTB tokenizer and scores METEOR with a Java process;
Bleu, ROUGE-L and CIDEr are Python. ``caption_scorer_problem`` says up front (before any
training) when Java or pycocoevalcap's files are missing. During a run:

- every caption is put on one line before tokenising (a caption holding a line break or a
  Unicode line separator shifted every later caption onto the wrong question in pycocoevalcap's
  own wrapper, silently), empty captions are not sent to Java, the tokenizer's temporary file
  goes to the system's temporary folder (not the package folder, which may be read-only), and its
  output is checked line by line; if Java fails, a Python approximation of the PTB tokenizer is
  used and a note says so;
- each metric is computed on its own: a failing one (METEOR's Java process dying, say; it is
  restarted once first) is None in the results with a note, and the caption score is the mean
  of the metrics that worked, with the gap stated.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from cl_bench.errors import describe

CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
JAVA_HINT = (
    "install a Java runtime (8 or newer), e.g. `apt-get install default-jre-headless` or "
    "`conda install -c conda-forge openjdk`, so that `java -version` works"
)
Tokens = dict[str, list[str]]


def caption_scorer_problem() -> str | None:
    """Why caption tasks cannot be scored on this machine (pycocoevalcap's files or a working
    Java missing), or None. Runs ``java -version`` (well under a second)."""
    try:
        from pycocoevalcap.meteor import meteor
        from pycocoevalcap.tokenizer import ptbtokenizer
    except ImportError as err:
        return f"pycocoevalcap cannot be imported ({describe(err)}): pip install pycocoevalcap"
    files = (Path(meteor.__file__).with_name(meteor.METEOR_JAR),
             Path(meteor.__file__).parent / "data" / "paraphrase-en.gz",
             Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR))
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        return f"pycocoevalcap is incomplete (missing {', '.join(missing)}): reinstall it"
    java = shutil.which("java")
    if java is None:
        return (f"pycocoevalcap's PTB tokenizer and METEOR run on Java, and no `java` is on "
                f"PATH: {JAVA_HINT}")
    try:
        subprocess.run([java, "-version"], capture_output=True, timeout=120, check=True)
    except (OSError, subprocess.SubprocessError) as err:
        return f"`{java} -version` failed ({describe(err)}): {JAVA_HINT}"
    return None


# ---------------------------------------------------------------- tokenising


def one_line(text: str) -> str:
    """``text`` with every run of whitespace, line breaks included, as one space."""
    return " ".join(text.split())


def ptb_tokenize(texts: list[str]) -> list[str]:
    """pycocoevalcap's tokenisation of each text: Stanford's PTB tokenizer (lower case, lines
    kept), then its punctuation tokens dropped. Raises if Java fails or loses a line."""
    from pycocoevalcap.tokenizer import ptbtokenizer

    lines = [one_line(t) for t in texts]
    todo = [line for line in lines if line]
    jar = Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "captions.txt"
        source.write_text("".join(f"{line}\n" for line in todo), encoding="utf-8")
        done = subprocess.run(
            ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
             "-preserveLines", "-lowerCase", "-encoding", "utf-8", str(source)],
            capture_output=True, timeout=3600,
        )
    if done.returncode != 0:
        tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
        raise RuntimeError(f"java exited with code {done.returncode} {tail}")
    out = done.stdout.decode("utf-8", "replace").split("\n")
    if out[-1] == "":
        out.pop()  # after the last line's break
    if len(out) != len(todo):
        raise RuntimeError(f"the tokenizer returned {len(out)} lines for {len(todo)} captions")
    tokenized = iter(out)
    drop = set(ptbtokenizer.PUNCTUATIONS)
    return [
        " ".join(w for w in next(tokenized).split() if w not in drop) if line else ""
        for line in lines
    ]


_SIMPLE_TOKEN = re.compile(r"n't|'[a-z]+|[a-z0-9]+(?:[-./][a-z0-9]+)*|\S")
_PTB_PUNCTUATION = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";",
                    "(", ")", "[", "]", "{", "}", '"'}


def simple_tokenize(text: str) -> str:
    """A Python approximation of the PTB tokenisation (lower case; "don't" -> "do n't",
    "dog's" -> "dog 's"; punctuation dropped), used only when Java fails."""
    text = re.sub(r"n't\b", " n't", one_line(text).lower())
    return " ".join(t for t in _SIMPLE_TOKEN.findall(text) if t not in _PTB_PUNCTUATION)


def tokenize_all(gts: dict[str, list[str]], res: dict[str, str]) -> tuple[Tokens, Tokens, str]:
    """References and predictions tokenised in one Java call; the note is empty unless the
    Python fallback had to be used."""
    ids = list(gts)
    texts = [c for q in ids for c in gts[q]] + [res[q] for q in ids]
    note = ""
    try:
        tokens = ptb_tokenize(texts)
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        tokens = [simple_tokenize(t) for t in texts]
        note = (f"the PTB tokenizer failed ({describe(err)}): captions were tokenised by "
                "cl-bench's Python approximation, so scores may differ slightly from "
                "pycocoevalcap's")
    stream = iter(tokens)
    gt_tokens = {q: [next(stream) for _ in gts[q]] for q in ids}
    return gt_tokens, {q: [next(stream)] for q in ids}, note


# ---------------------------------------------------------------- the metrics


@functools.cache
def meteor_scorer():
    """One METEOR Java process per Python process: starting it (loading its paraphrase tables)
    costs seconds, each later call milliseconds."""
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def _discard_meteor() -> None:
    """Forget the METEOR process after a failure: release the lock a failed call left held (its
    ``__del__`` would wait on it forever) and stop the process."""
    if meteor_scorer.cache_info().currsize:
        scorer = meteor_scorer()
        if scorer.lock.locked():
            scorer.lock.release()
        with contextlib.suppress(OSError, ValueError):
            scorer.meteor_p.stdin.close()
        scorer.meteor_p.kill()
    meteor_scorer.cache_clear()


def meteor(gts: Tokens, res: Tokens) -> dict[str, float]:
    """METEOR 1.5, restarted once if its Java process fails (it may have died since the last
    call); a second failure is raised."""
    for attempt in (1, 2):
        try:
            value, _ = meteor_scorer().compute_score(gts, res)
            return {"METEOR": float(value)}
        except (OSError, ValueError) as err:
            _discard_meteor()
            if attempt == 2:
                raise RuntimeError(f"METEOR failed twice, last: {describe(err)}") from None
    raise AssertionError("unreachable")


def bleu(gts: Tokens, res: Tokens) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu

    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its length ratio
        values, _ = Bleu(4).compute_score(gts, res)
    return {f"Bleu_{n}": float(v) for n, v in enumerate(values, 1)}


def rouge(gts: Tokens, res: Tokens) -> dict[str, float]:
    from pycocoevalcap.rouge.rouge import Rouge

    return {"ROUGE_L": float(Rouge().compute_score(gts, res)[0])}


def cider(gts: Tokens, res: Tokens) -> dict[str, float]:
    from pycocoevalcap.cider.cider import Cider

    return {"CIDEr": float(Cider().compute_score(gts, res)[0])}


METRIC_STEPS: dict[str, tuple[Callable[[Tokens, Tokens], dict[str, float]], tuple[str, ...]]] = {
    "Bleu": (bleu, CAPTION_METRICS[:4]),
    "METEOR": (meteor, ("METEOR",)),
    "ROUGE_L": (rouge, ("ROUGE_L",)),
    "CIDEr": (cider, ("CIDEr",)),
}


def caption_metrics(
    predictions: dict[str, str], references: dict[str, list[str]],
) -> tuple[dict[str, float | None], list[str]]:
    """The seven COCO caption metrics (0..1, CIDEr up to 10) on PTB-tokenised captions, a
    failed metric as None, and notes saying what failed and why."""
    ids = sorted(references)
    gts, res, note = tokenize_all({q: references[q] for q in ids}, {q: predictions[q] for q in ids})
    notes = [note] if note else []
    values: dict[str, float | None] = {}
    for name, (compute, names) in METRIC_STEPS.items():
        try:
            values |= compute(gts, res)
        except Exception as err:  # noqa: BLE001 - any failure marks the metric, never the run
            values |= dict.fromkeys(names)
            notes.append(f"{name} failed: {describe(err)}")
    return values, notes
