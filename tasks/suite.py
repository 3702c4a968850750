"""Suite and task definitions: what a task is, where its files are, in which order tasks come."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cl_bench.errors import CLBenchError
from cl_bench.registry import unknown_name_error


@dataclass(frozen=True)
class TaskSpec:
    """One task of a suite: its files (candidate names, first found wins), prompt and metric."""

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


@dataclass(frozen=True)
class TaskFiles:
    """Resolved paths of one task's data on disk."""

    train: Path
    test: Path
    image_root: Path


@dataclass(frozen=True)
class Suite:
    """A named sequence of tasks with a data layout under a data root.

    Layout: ``<data_root>/<tasks_dir>/<task folder>/<train|test file>``, images under
    ``<data_root>/<image_dir>`` (paths in the JSON files are relative to it). A suite with a
    ``generator`` ("module:function", called as ``function(cache_dir) -> data_root``) makes
    its own data when no data root is given, and one with a ``default_model`` (likewise,
    returning a model folder) its own starting model. ``defaults`` are dotted config keys the suite
    sets before the user's config file and ``--set`` options (e.g. a learning rate).
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
            if "," not in order and len(order) == len(self.tasks) and set(order) <= set(letters):
                chosen = [letters[c] for c in order]
            else:
                chosen = [self.task(n.strip()) for n in order.split(",") if n.strip()]
        else:
            chosen = [self.task(n) for n in order]
        names = [t.name for t in chosen]
        if len(set(names)) != len(names):
            raise CLBenchError(f"order {order!r} names a task twice: {names}")
        return chosen

    def task_files(self, spec: TaskSpec, data_root: Path) -> TaskFiles:
        """Resolve a task's files under ``data_root``; a missing one is a clear error."""
        base = data_root / self.tasks_dir
        folder = next((base / f for f in spec.folders if (base / f).is_dir()), None)
        if folder is None:
            raise CLBenchError(
                f"{self.name}: task folder for {spec.name} not found (looked for "
                f"{' or '.join(str(base / f) for f in spec.folders)}). Expected layout: "
                f"{self.layout_hint()}. Data: {self.data_source}"
            )
        return TaskFiles(
            train=_first_existing(folder, spec.train_files, self),
            test=_first_existing(folder, spec.test_files, self),
            image_root=data_root / self.image_dir,
        )

    def layout_hint(self) -> str:
        base = f"<data_root>/{self.tasks_dir + '/' if self.tasks_dir else ''}"
        return f"{base}<Task>/{{train,test}}.json with images under <data_root>/{self.image_dir}"


def _first_existing(folder: Path, names: tuple[str, ...], suite: Suite) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise CLBenchError(
        f"{suite.name}: none of {', '.join(names)} found in {folder}. "
        f"Expected layout: {suite.layout_hint()}. Data: {suite.data_source}"
    )
