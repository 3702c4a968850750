"""Suite and task definitions: what a task is, where its files are, in which order tasks come."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cl_bench.errors import CLBenchError
from cl_bench.registry import unknown_name_error


@dataclass(frozen=True)
class TaskSpec:
    """One task of a suite: its files (candidate names, first found wins), prompt and metric.

    ``reference_files`` name an optional annotation file with several references per question
    (COCO captions such as ``val_coco_type_3000.json``, or VQA/TextVQA answers), looked for in
    the task folder, then under the image root; without one, a test record's own answer is its
    only reference.
    """

    name: str
    letter: str
    folders: tuple[str, ...]
    instruction: str
    answer_type: str
    train_files: tuple[str, ...] = ("train.json",)
    test_files: tuple[str, ...] = ("test.json",)
    rule: str = "exact"
    expected_train: int | None = None
    expected_test: int | None = None
    reference_files: tuple[str, ...] = ()


@dataclass(frozen=True)
class TaskFiles:
    """Resolved paths of one task's data on disk."""

    train: Path
    test: Path
    image_root: Path
    references: Path | None = None


@dataclass(frozen=True)
class TaskLocation:
    """Where a task's files were looked for, and what was found there (None: nothing)."""

    folder_candidates: tuple[Path, ...]
    folder: Path | None
    train: Path | None
    test: Path | None
    references: Path | None
    image_root: Path


@dataclass(frozen=True)
class Suite:
    """A named sequence of tasks with a data layout under a data root.

    Layout: ``<data_root>/<tasks_dir>/<task folder>/<train|test file>``, images under
    ``<data_root>/<image_dir>`` (paths in the JSON files are relative to it). A suite with a
    ``generator`` ("module:function", called as ``function(cache_dir) -> data_root``) makes
    its own data when no data root is given, and one with a ``default_model`` (likewise,
    returning a model folder) its own starting model. ``default_encoder`` (likewise, returning a
    local CLIP folder) is the image/text feature encoder methods such as HiDe-LLaVA use for their
    anchors when the run names none. ``defaults`` are dotted config keys the suite sets before
    the user's config file and ``--set`` options (e.g. a learning rate).
    """

    name: str
    description: str
    tasks: tuple[TaskSpec, ...]
    data_source: str
    tasks_dir: str = ""
    image_dir: str = ""
    inquiry_file: str | None = None
    probe_file: str | None = None
    general_benchmarks: tuple[str, ...] = ()
    generator: str | None = None
    default_model: str | None = None
    default_encoder: str | None = None
    defaults: dict[str, object] = field(default_factory=dict, compare=False)

    def task(self, name: str) -> TaskSpec:
        for spec in self.tasks:
            if spec.name == name:
                return spec
        raise unknown_name_error(f"task of suite {self.name!r}", name, self.task_names())

    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def resolve_order(self, order: str | list[str] | None) -> list[TaskSpec]:
        """Tasks in the given order: None (default), letters ("RAVICF") or names."""
        if not order:
            return list(self.tasks)
        if isinstance(order, str):
            letters = {t.letter: t for t in self.tasks}
            by_letters = "," not in order and order not in self.task_names()
            if by_letters and set(order) <= set(letters):
                chosen = [letters[c] for c in order]
            else:
                chosen = [self.task(n.strip()) for n in order.split(",") if n.strip()]
        else:
            chosen = [self.task(n) for n in order]
        names = [t.name for t in chosen]
        if len(set(names)) != len(names):
            raise CLBenchError(f"order {order!r} names a task twice: {names}")
        return chosen

    def locate(self, spec: TaskSpec, data_root: Path) -> TaskLocation:
        """Look for a task's folder and files under ``data_root`` without raising."""
        base = data_root / self.tasks_dir
        candidates = tuple(base / f for f in spec.folders)
        image_root = data_root / self.image_dir
        folder = next((c for c in candidates if c.is_dir()), None)
        if folder is None:
            return TaskLocation(candidates, None, None, None, None, image_root)
        references = next(
            (d / name for name in spec.reference_files for d in (folder, image_root)
             if (d / name).is_file()),
            None,
        )
        return TaskLocation(
            candidates, folder, _first_file(folder, spec.train_files),
            _first_file(folder, spec.test_files), references, image_root,
        )

    def task_files(self, spec: TaskSpec, data_root: Path) -> TaskFiles:
        """Resolve a task's files under ``data_root``; a missing one is a clear error."""
        found = self.locate(spec, data_root)
        if found.folder is None:
            raise CLBenchError(
                f"{self.name}: task folder for {spec.name} not found (looked for "
                f"{' or '.join(str(c) for c in found.folder_candidates)}). Expected layout: "
                f"{self.layout_hint()}. Data: {self.data_source}"
            )
        for path, names in ((found.train, spec.train_files), (found.test, spec.test_files)):
            if path is None:
                raise CLBenchError(
                    f"{self.name}: none of {', '.join(names)} found in {found.folder}. "
                    f"Expected layout: {self.layout_hint()}. Data: {self.data_source}"
                )
        assert found.train is not None and found.test is not None
        return TaskFiles(found.train, found.test, found.image_root, found.references)

    def layout_hint(self) -> str:
        base = f"<data_root>/{self.tasks_dir + '/' if self.tasks_dir else ''}"
        return f"{base}<Task>/{{train,test}}.json with images under <data_root>/{self.image_dir}"


def _first_file(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)
