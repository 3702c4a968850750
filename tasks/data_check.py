"""Check a suite's data folder before a long run, collecting every problem instead of the first.

``check_suite_data(suite, data_root, tasks)`` looks for each task's folder and files as the suite
declares them, reads every file (an encoding or JSON syntax error names the file, byte offset or
line), parses every record with the loaders' typed checks (a null, list or empty value where text
is expected names the record and key), reads the task's annotation file, checks the test
references against the task's answer type, looks for every referenced image and opens and decodes
each once (``fast=True`` only looks them up), and compares the counts with the expected ones.
Problems (the run cannot work) and notes (it can, but something differs from the published
setup) are kept per task; ``DataReport.table`` prints the summary and ``DataReport.ok`` says
whether a run may start. ``require_valid_data`` is this same check, raising: runs call it before
the model loads, so bad data never surfaces after training has started.
"""

from __future__ import annotations

import os
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cl_bench.errors import CLBenchError
from tasks.images import cache_file, verify_images
from tasks.loaders import (
    IMAGE_TOKEN,
    Sample,
    load_samples,
    parse_record,
    read_records,
    read_reference_table,
    with_references,
)
from tasks.suite import Suite, TaskSpec

SHOWN = 3  # examples listed per kind of problem


@dataclass
class FileCheck:
    """One data file as read: its records, the bad ones and its images."""

    path: Path
    samples: list[Sample] = field(default_factory=list)
    records: int = 0
    images: list[Path] = field(default_factory=list)
    missing_images: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class TaskCheck:
    """What the check found for one task."""

    task: TaskSpec
    folder: Path | None = None
    files: list[str] = field(default_factory=list)
    train: int | None = None
    test: int | None = None
    missing_images: int = 0
    broken_images: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    read: list[FileCheck] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class DataReport:
    """The data check of a suite under a data root: per-task results and suite-level findings."""

    suite: Suite
    data_root: Path
    tasks: list[TaskCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    images: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems and all(t.ok for t in self.tasks)

    def problem_count(self) -> int:
        return len(self.problems) + sum(len(t.problems) for t in self.tasks)

    def table(self) -> str:
        """The summary table, then every problem and note."""
        lines = [
            f"Data check of suite {self.suite.name} in {self.data_root}",
            f"Layout: {self.suite.layout_hint()}",
            "",
        ]
        head = ("task", "folder", "files", "train", "expected", "test", "expected",
                "missing images", "broken images", "status")
        rows = [head, *(self._row(t) for t in self.tasks)]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        numeric = {3, 4, 5, 6, 7, 8}
        for row in rows:
            cells = [c.rjust(w) if i in numeric else c.ljust(w)
                     for i, (c, w) in enumerate(zip(row, widths, strict=True))]
            lines.append("  ".join(cells).rstrip())
        if self.images:
            lines += ["", self.images]
        for title, items in (("Problems", self._findings("problems")),
                             ("Notes", self._findings("notes"))):
            if items:
                lines += ["", f"{title}:", *(f"  - {item}" for item in items)]
        verdict = "OK" if self.ok else f"FAILED: {self.problem_count()} problem(s)"
        lines += ["", f"Data check {verdict}."]
        if not self.ok:
            lines.append(f"Data: {self.suite.data_source}")
        return "\n".join(lines)

    def _row(self, t: TaskCheck) -> tuple[str, ...]:
        folder = "-" if t.folder is None else _relative(t.folder, self.data_root)
        status = "ok" if t.ok else f"{len(t.problems)} problem(s)"
        return (t.task.name, folder, " + ".join(t.files) or "-", _count(t.train),
                _count(t.task.expected_train), _count(t.test), _count(t.task.expected_test),
                str(t.missing_images), str(t.broken_images), status)

    def _findings(self, kind: str) -> list[str]:
        items = list(getattr(self, kind))
        for t in self.tasks:
            items += [f"{t.task.name}: {p}" for p in getattr(t, kind)]
        return items

    def error_message(self) -> str:
        """One paragraph saying why a run may not start on this data."""
        found = self._findings("problems")
        shown = "; ".join(found[:SHOWN]) + ("; ..." if len(found) > SHOWN else "")
        return (
            f"the data of suite {self.suite.name} in {self.data_root} has "
            f"{self.problem_count()} problem(s), so nothing was trained: {shown}. For the full "
            f"report run `clbench data check --suite {self.suite.name} --data-root "
            f"{self.data_root}`. Expected layout: {self.suite.layout_hint()}. "
            f"Data: {self.suite.data_source}"
        )


def _count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root)) or "."
    except ValueError:
        return str(path)


def _examples(items: Sequence[str], total: int | None = None) -> str:
    total = len(items) if total is None else total
    shown = ", ".join(items[:SHOWN])
    return shown + (f", ... ({total - SHOWN} more)" if total > SHOWN else "")


def check_suite_data(
    suite: Suite, data_root: Path, tasks: Sequence[TaskSpec] | None = None,
    fast: bool = False, cache: Path | None = None,
) -> DataReport:
    """Check every task of ``tasks`` (default: all of the suite's) under ``data_root``.

    Every image a record names is opened and decoded once (in parallel, with progress), unless
    ``fast``, which only looks them up. ``cache`` (a folder) remembers the images verified
    before, by size and modification time, so a second check decodes only new or changed ones.
    """
    report = DataReport(suite, data_root)
    if not data_root.is_dir():
        report.problems.append(f"data root {data_root} is not a folder")
        return report
    tasks = list(tasks or suite.tasks)
    report.tasks = [check_task(suite, spec, data_root) for spec in tasks]
    report.problems += caption_problems(tasks)
    if suite.inquiry_file:
        inquiry = data_root / suite.inquiry_file
        if not inquiry.exists():
            report.notes.append(
                f"no inquiry file {inquiry} (only methods with inquiry regularisation, e.g. "
                "llava_c, need it)"
            )
        else:
            report.problems += _load_problems(inquiry)
    report.images = check_images(report, fast, cache)
    return report


def caption_problems(tasks: Sequence[TaskSpec]) -> list[str]:
    """Caption tasks need pycocoevalcap and Java: checked only when a caption task is run."""
    from tasks.captions import caption_scorer_problem

    captions = [t.name for t in tasks if t.answer_type == "caption"]
    problem = caption_scorer_problem() if captions else None
    return [f"caption task(s) {', '.join(captions)}: {problem}"] if problem else []


def _load_problems(path: Path) -> list[str]:
    try:
        load_samples(path, path.parent, check_images=False)
    except CLBenchError as err:
        return [str(err)]
    return []


def check_task(suite: Suite, spec: TaskSpec, data_root: Path) -> TaskCheck:
    """Find and read one task's files, collecting every problem (images are decoded later, by
    ``check_images``, once for the whole suite)."""
    check = TaskCheck(spec)
    found = suite.locate(spec, data_root)
    check.folder = found.folder
    if found.folder is None:
        looked = " or ".join(str(c) for c in found.folder_candidates)
        check.problems.append(f"task folder not found (looked for {looked})")
        return check
    if not found.image_root.is_dir():
        check.problems.append(f"image folder {found.image_root} not found")
    for role, path, names in (("train", found.train, spec.train_files),
                              ("test", found.test, spec.test_files)):
        if path is None:
            folders = [n for n in names if (found.folder / n).is_dir()]
            odd = f"; {', '.join(folders)} is a folder, not a file" if folders else ""
            check.problems.append(
                f"no {role} file in {found.folder} (looked for {', '.join(names)}{odd})"
            )
            continue
        check.files.append(path.name)
        read = read_file(path, found.image_root)
        check.read.append(read)
        check.problems += read.problems
        check.notes += read.notes
        if read.missing_images:
            check.missing_images += len(read.missing_images)
            check.problems.append(
                f"{path.name}: {len(read.missing_images)} of "
                f"{len(read.images) + len(read.missing_images)} images missing under "
                f"{found.image_root}, e.g. {_examples(read.missing_images)}"
            )
        if role == "train":
            check.train = read.records
        else:
            check.test = read.records
            samples = _with_reference_file(spec, found.references, read.samples, check)
            check.problems += reference_problems(spec, path, samples)
            check.notes += instruction_notes(spec, path, samples)
    check.notes += count_notes(check)
    return check


def count_notes(check: TaskCheck) -> list[str]:
    """A note when the record counts differ from the published ones (fine for a subset)."""
    pairs = []
    for role, found, expected in (("train", check.train, check.task.expected_train),
                                  ("test", check.test, check.task.expected_test)):
        if found and expected is not None and found != expected:
            pairs.append(f"{found:,} {role} records (published: {expected:,})")
    return [f"{' and '.join(pairs)}; fine for a subset"] if pairs else []


def read_file(path: Path, image_root: Path) -> FileCheck:
    """Read and parse every record of ``path`` and look for every image it names."""
    result = FileCheck(path)
    try:
        records = read_records(path)
    except CLBenchError as err:
        result.problems.append(str(err))
        return result
    result.records = len(records)
    if not records:
        result.problems.append(f"{path}: no records")
    bad, parsed = [], []
    for i, record in enumerate(records):
        try:
            result.samples.append(parse_record(record, f"record {i}", image_root, False))
            parsed.append(record)
        except CLBenchError as err:
            bad.append(str(err))
    if bad:
        result.problems.append(f"{path}: {len(bad)} bad record(s): {_examples(bad)}")
    result.notes += image_notes(path, parsed, result.samples)
    for image in dict.fromkeys(s.image for s in result.samples if s.image is not None):
        if image.is_file():
            result.images.append(image)
        else:
            result.missing_images.append(_relative(image, image_root))
    shown = result.missing_images[:SHOWN]
    result.missing_images[:SHOWN] = [_missing_hint(image_root, m) for m in shown]
    return result


def image_notes(path: Path, records: list[dict], samples: list[Sample]) -> list[str]:
    """Notes on records (``records[i]`` parsed as ``samples[i]``) asked without an image: when
    only some have one (a lost 'image' key?), and when one names no image but its question has
    an '<image>' token (an image under another key, e.g. 'img', is never read)."""
    blind = [(r, s) for r, s in zip(records, samples, strict=True) if s.image is None]
    notes = []
    if blind and len(blind) < len(samples):
        notes.append(f"{path.name}: {len(blind)} of {len(samples)} records have no image and are "
                     f"asked without one, e.g. ids {_examples([s.id for _, s in blind])}")
    tokens = [s.id for r, s in blind if _mentions_image(r)]
    if tokens:
        notes.append(f"{path.name}: {len(tokens)} record(s) name no image but have an "
                     f"'{IMAGE_TOKEN}' token, e.g. ids {_examples(tokens)}")
    return notes


def _mentions_image(record: dict) -> bool:
    turns = record.get("conversations")
    texts = [record.get("text"), *(t.get("value") for t in turns if isinstance(t, dict))] if (
        isinstance(turns, list)) else [record.get("text")]
    return any(isinstance(t, str) and IMAGE_TOKEN in t for t in texts)


def _missing_hint(image_root: Path, relative: str) -> str:
    """A missing image, with what is there instead: a folder, or a name that differs only in
    case, Unicode normalisation or surrounding spaces (exports from other systems)."""
    path = image_root / relative
    if path.is_dir():
        return f"{relative} (a folder, not a file)"
    if not path.parent.is_dir():
        return f"{relative} (no folder {_relative(path.parent, image_root)})"
    wanted = _loose(path.name)
    near = next((n for n in os.listdir(path.parent) if _loose(n) == wanted), None)
    return f"{relative} (there is {near!r})" if near else relative


def _loose(name: str) -> str:
    return unicodedata.normalize("NFC", name).strip().casefold()


def check_images(report: DataReport, fast: bool, cache: Path | None) -> str:
    """Decode every image the checked files name, once, and add a problem per file with images
    that cannot be decoded. Returns a one-line summary."""
    images = {img: None for t in report.tasks for read in t.read for img in read.images}
    if fast:
        return (f"Images: {len(images):,} looked up, not decoded (--fast): an undecodable "
                "image would stop a run before training.")
    store = cache_file(cache, report.data_root) if cache else None
    verified = verify_images(images, store)
    broken = verified.problems
    for task in report.tasks:
        for read in task.read:
            bad = [img for img in read.images if img in broken]
            if not bad:
                continue
            task.broken_images += len(bad)
            examples = [f"{_relative(img, report.data_root)} ({broken[img]})" for img in bad]
            task.problems.append(
                f"{read.path.name}: {len(bad)} of {len(read.images)} images cannot be "
                f"decoded, e.g. {_examples(examples)}"
            )
    if not verified.remembered:
        return f"Images: {len(images):,} opened and decoded, {len(broken):,} failed."
    return (f"Images: {len(images):,} checked: {verified.decoded:,} opened and decoded now, "
            f"{verified.remembered:,} decoded by an earlier check and unchanged since; "
            f"{len(broken):,} failed.")


def _with_reference_file(
    spec: TaskSpec, path: Path | None, samples: list[Sample], check: TaskCheck
) -> list[Sample]:
    """Samples with the references of the task's annotation file, if it declares one."""
    if not spec.reference_files:
        return samples
    if path is None:
        several = spec.answer_type in ("vqa", "caption")
        if not several or all(len(s.references) > 1 for s in samples):
            return samples
        check.notes.append(
            f"no annotation file ({' or '.join(spec.reference_files)} in the task folder or the "
            "image folder): each test record's own answer is its only reference"
        )
        return samples
    try:
        table = read_reference_table(path)
    except CLBenchError as err:
        check.problems.append(str(err))
        return samples
    check.files.append(path.name)
    check.notes += [f"{path.name}: {note}" for note in table.notes]
    samples, unmatched = with_references(samples, table)
    if unmatched:
        check.notes.append(
            f"{path.name} has no references for {unmatched} of {len(samples)} test questions "
            "(their own answer is used)"
        )
    return samples


def reference_problems(spec: TaskSpec, path: Path, samples: list[Sample]) -> list[str]:
    """Duplicate question ids and references the task's scorer cannot use."""
    from tasks.scoring import parse_box, reference_letter

    problems = []
    duplicates = sorted(i for i, n in Counter(s.id for s in samples).items() if n > 1)
    if duplicates:
        problems.append(
            f"{path.name}: {len(duplicates)} question id(s) used more than once (answers are "
            f"matched by id): {_examples(duplicates)}"
        )
    bad = []
    for sample in samples:
        if not sample.references:
            bad.append(f"{sample.id} (no reference answer)")
        elif spec.answer_type == "option":
            try:
                for ref in sample.references:
                    reference_letter(ref)
            except CLBenchError:
                bad.append(f"{sample.id} ({sample.references[0]!r} is no option letter)")
        elif spec.answer_type == "bbox" and any(parse_box(r) is None for r in sample.references):
            bad.append(f"{sample.id} ({sample.references[0]!r} is no [x1, y1, x2, y2] box)")
    if bad:
        problems.append(
            f"{path.name}: {len(bad)} test record(s) without a usable {spec.answer_type} "
            f"reference: {_examples(bad)}"
        )
    return problems


def instruction_notes(spec: TaskSpec, path: Path, samples: list[Sample]) -> list[str]:
    """A note when no test question has the task's instruction (a sign of the wrong file)."""
    instruction = spec.instruction.strip().rstrip(".:").lower()
    if not instruction or any(instruction in s.question.lower() for s in samples):
        return []
    return [f"no question in {path.name} has the task's instruction {spec.instruction!r}"]


def require_valid_data(
    suite: Suite, data_root: Path, tasks: Sequence[TaskSpec], cache: Path | None = None,
) -> DataReport:
    """The data check a run does up front (images decoded, Java for captions): raises with one
    paragraph when the data is broken."""
    report = check_suite_data(suite, data_root, tasks, cache=cache)
    if not report.ok:
        raise CLBenchError(report.error_message())
    return report
