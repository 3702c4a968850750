"""The micro world's procedural data: determinism, layout, formats, balance, benchmarks."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image

from tasks.loaders import load_samples
from tasks.micro.fingerprint import tree_sha256
from tasks.micro.general import GENERAL_MIX, WORD_INSTRUCTION
from tasks.micro.mix665k import MIX_DIR, MIX_SOURCES
from tasks.micro.scene import plural
from tasks.micro.tasks import (
    CHART_COLOURS,
    ICON_OPTIONS,
    MICRO_TASKS,
    generate,
    icon_count,
    icon_most,
)
from tasks.micro.world import COLOURS, OBJECTS, SHAPES, MicroWorldConfig, rng_for
from tasks.micro.write import generate_micro_world
from tasks.suites.ucit import UCIT_TASKS

TINY = MicroWorldConfig(n_train=20, n_test=10, n_general=60, n_inquiry=10, n_probe=8, n_bench=24,
                        n_clip=40, n_align=12, n_text=12)
TASK_NAMES = [t.name for t in UCIT_TASKS]
BENCH_FILES = ("mme", "pope_random", "pope_popular", "pope_adversarial", "open")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_micro_world(tmp_path_factory.mktemp("micro"), TINY)


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_generation_is_deterministic(world: Path, tmp_path: Path) -> None:
    again = generate_micro_world(tmp_path, TINY)
    assert again.name == world.name == TINY.fingerprint()
    assert files_of(again) == files_of(world)


def test_existing_folder_is_returned_and_no_staging_is_left(world: Path) -> None:
    stamp = (world / "manifest.json").stat().st_mtime_ns
    assert generate_micro_world(world.parent, TINY) == world
    assert (world / "manifest.json").stat().st_mtime_ns == stamp
    assert [p.name for p in world.parent.iterdir()] == [world.name]


def test_fingerprint_is_stable_and_follows_the_config() -> None:
    assert TINY.fingerprint() == MicroWorldConfig(**vars(TINY)).fingerprint()
    assert TINY.fingerprint() != MicroWorldConfig(seed=1, **{
        k: v for k, v in vars(TINY).items() if k != "seed"}).fingerprint()


def test_layout_and_counts(world: Path) -> None:
    manifest = load(world / "manifest.json")
    assert manifest["fingerprint"] == world.name
    assert manifest["config"] == vars(TINY)
    expected = [f"UCIT/{t}/{s}.json" for t in TASK_NAMES for s in ("train", "test")]
    expected += ["general/train.json"]
    expected += [f"{MIX_DIR}/{m.name}/{s}.json" for m in MIX_SOURCES for s in ("train", "test")]
    expected += ["general/inquiries.json", "general/probes.json"]
    expected += [f"general/bench/{b}.json" for b in BENCH_FILES]
    expected += ["pretrain/clip.json", "pretrain/align.json", "pretrain/text.json"]
    assert list(manifest["counts"]) == expected
    for rel, count in manifest["counts"].items():
        assert len(load(world / rel)) == count, rel
    for task in TASK_NAMES:
        assert manifest["counts"][f"UCIT/{task}/train.json"] == TINY.n_train
        assert manifest["counts"][f"UCIT/{task}/test.json"] == TINY.n_test
    assert manifest["counts"]["general/train.json"] == TINY.n_general
    assert manifest["counts"]["general/inquiries.json"] == TINY.n_inquiry
    assert manifest["counts"]["general/probes.json"] == TINY.n_probe
    for bench in BENCH_FILES:
        assert manifest["counts"][f"general/bench/{bench}.json"] == TINY.n_bench
    for name, n in (("clip", TINY.n_clip), ("align", TINY.n_align), ("text", TINY.n_text)):
        assert manifest["counts"][f"pretrain/{name}.json"] == n
    assert manifest["content_sha256"] == tree_sha256_without_manifest(world)


def tree_sha256_without_manifest(world: Path) -> str:
    manifest = (world / "manifest.json").read_bytes()
    (world / "manifest.json").unlink()
    try:
        return tree_sha256(world)
    finally:
        (world / "manifest.json").write_bytes(manifest)


def image_roots(world: Path) -> dict[str, Path]:
    roots = {f"UCIT/{t}/{s}.json": world / "UCIT" / "datasets"
             for t in TASK_NAMES for s in ("train", "test")}
    roots |= {rel: world / "general" for rel in load(world / "manifest.json")["counts"]
              if rel.startswith(("general/", MIX_DIR))}
    roots |= {f"pretrain/{n}.json": world / "pretrain" for n in ("clip", "align", "text")}
    return roots


def test_every_image_exists_and_is_32px_rgb(world: Path) -> None:
    referenced = set()
    for rel, root in image_roots(world).items():
        for rec in load(world / rel):
            if "image" in rec:
                referenced.add(root / rec["image"])
    for path in referenced:
        with Image.open(path) as img:
            assert (img.size, img.mode) == ((32, 32), "RGB"), path
    assert referenced == set(world.rglob("*.png"))
    assert len(referenced) == load(world / "manifest.json")["images"]


def test_the_real_loaders_read_every_file(world: Path) -> None:
    for rel, root in image_roots(world).items():
        if rel.endswith(("inquiries.json", "probes.json", "clip.json")):
            continue
        samples = load_samples(world / rel, root)
        assert samples and all(s.question for s in samples), rel


def test_ucit_instructions_and_formats(world: Path) -> None:
    for spec in UCIT_TASKS:
        for rec in load(world / "UCIT" / spec.name / "train.json"):
            human, gpt = rec["conversations"]
            assert (human["from"], gpt["from"]) == ("human", "gpt")
            assert human["value"].startswith("<image>\n")
            assert human["value"].endswith(spec.instruction)
            assert rec["image"].startswith(f"{spec.name}/train/")
            assert gpt["value"]
        for rec in load(world / "UCIT" / spec.name / "test.json"):
            assert set(rec) >= {"question_id", "image", "text", "answer"}
            assert "<image>" not in rec["text"] and rec["text"].endswith(spec.instruction)
            if spec.answer_type == "caption":
                assert rec["references"][0] == rec["answer"] and len(rec["references"]) == 3
            if spec.answer_type == "option" and spec.name != "IconQA":
                assert rec["answer"] in "ABCD" and "\nD. " in rec["text"]


def test_iconqa_test_uses_index_options_and_train_letters(world: Path) -> None:
    test = load(world / "UCIT" / "IconQA" / "test.json")
    assert all(r["answer"] in "0123" and "\n0. " in r["text"] and "\nA. " not in r["text"]
               for r in test)
    train = load(world / "UCIT" / "IconQA" / "train.json")
    assert all(r["conversations"][1]["value"] in "ABCD" for r in train)


def test_general_mix_has_no_task_format_but_llava_short_answers(world: Path) -> None:
    """Full sentences, except one-word answers under LLaVA-1.5's short-answer instruction (which
    ImageNet-R and CLEVR-Math share, as with the real LLaVA-1.5) and yes/no answers; never the
    option or caption tasks' instructions."""
    instructions = {t.instruction for t in UCIT_TASKS} - {WORD_INSTRUCTION}
    records = load(world / "general" / "train.json")
    assert any("image" not in r for r in records) and any("image" in r for r in records)
    for r in records:
        human, gpt = (c["value"] for c in r["conversations"])
        assert not any(i in human for i in instructions)
        assert ("<image>" in human) == ("image" in r) == ("caption" in r)
        if r["category"] == "short":
            assert human.endswith(WORD_INSTRUCTION) and gpt.isalpha() and gpt.islower()
        else:
            assert WORD_INSTRUCTION not in human
            assert gpt.endswith(".") and gpt[0].isupper()  # a full sentence
    assert sum(r["category"] == "short" for r in records) >= len(records) // 20
    for name in ("inquiries", "probes"):
        for r in load(world / "general" / f"{name}.json"):
            assert set(r) <= {"id", "text", "image", "category"} and "answer" not in r
            assert not any(i in r["text"] for i in instructions)
    assert all("image" not in r for r in load(world / "general" / "inquiries.json"))


@pytest.mark.parametrize("name", ["ArxivQA", "IconQA"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_option_answers_are_balanced(name: str, split: str) -> None:
    task = next(t for t in MICRO_TASKS if t.name == name)
    answers = Counter(ex.answer for ex in generate(task, 3, split, 400, 32))
    assert len(answers) == 4 and set(answers.values()) == {100}


@pytest.mark.parametrize("name", ["ArxivQA", "IconQA"])
def test_option_tasks_list_the_same_options_for_each_question(name: str) -> None:
    task = next(t for t in MICRO_TASKS if t.name == name)
    blocks = defaultdict(set)
    for ex in generate(task, 1, "train", 120, 32):
        question, *options, _ = ex.question.split("\n")
        blocks[question.split(" ")[1]].add(tuple(options))  # "How many <shape>" -> "many"
    assert all(len(v) == 1 for v in blocks.values())  # one option list per question kind
    expected = {"ArxivQA": [CHART_COLOURS], "IconQA": list(ICON_OPTIONS.values())}[name]
    assert {opts for v in blocks.values() for opts in v} == {
        tuple(f"{letter}. {o}" for letter, o in zip("ABCD", opts, strict=True))
        for opts in expected}


def leftmost_bar_colour(image: Image.Image) -> str:
    """The chart colour nearest the first bar pixel right of the y axis."""
    pixels = image.convert("RGB").load()
    for x in range(6, image.width):
        for y in range(4, image.height - 4):
            def distance(colour: str, pixel=pixels[x, y]) -> int:
                return sum(abs(a - b) for a, b in zip(COLOURS[colour], pixel, strict=True))

            nearest = min(CHART_COLOURS, key=distance)
            if distance(nearest) < 90:
                return nearest
    raise AssertionError("no bar found")


def test_arxivqa_letter_names_the_option_true_of_the_chart() -> None:
    task = next(t for t in MICRO_TASKS if t.name == "ArxivQA")
    leftmost = [ex for ex in generate(task, 2, "train", 160, 32)
                if ex.question.startswith("What is the colour of the leftmost bar?")]
    assert len(leftmost) == 40
    for ex in leftmost:
        assert leftmost_bar_colour(ex.image) == CHART_COLOURS["ABCD".index(ex.answer)]


@pytest.mark.parametrize("position", range(4))
def test_iconqa_scenes_make_the_option_at_position_true(position: int) -> None:
    for i in range(20):
        shapes, question = icon_count(rng_for(0, "count", position, i), position)
        target = next(s for s in SHAPES if f" {plural(s)} " in question)
        assert shapes.count(target) == position + 1
        shapes, _ = icon_most(rng_for(0, "most", position, i), position)
        counts = Counter(shapes).most_common()
        assert counts[0][0] == SHAPES[position] and (len(counts) == 1
                                                     or counts[1][1] < counts[0][1])


def test_word_answers_are_balanced() -> None:
    imagenet, clevr = MICRO_TASKS[0], MICRO_TASKS[4]
    classes = Counter(ex.answer for ex in generate(imagenet, 0, "train", 320, 32))
    assert set(classes) == set(OBJECTS) and set(classes.values()) == {40}
    numbers = Counter(ex.answer for ex in generate(clevr, 0, "train", 240, 32))
    assert set(numbers) == {"one", "two", "three", "four"} and set(numbers.values()) == {60}


def test_task_order_matches_ucit() -> None:
    assert [t.name for t in MICRO_TASKS] == TASK_NAMES
    assert [t.answer_type for t in MICRO_TASKS] == [t.answer_type for t in UCIT_TASKS]


def test_pope_splits_are_balanced_and_share_images_and_positives(world: Path) -> None:
    splits = {s: load(world / "general" / "bench" / f"pope_{s}.json")
              for s in ("random", "popular", "adversarial")}
    positives = []
    for split, recs in splits.items():
        assert all(r["category"] == split for r in recs)
        assert Counter(r["answer"] for r in recs) == {"yes": len(recs) // 2, "no": len(recs) // 2}
        per_image = defaultdict(list)
        for r in recs:
            per_image[r["image"]].append(r["answer"])
        assert all(Counter(a) == {"yes": 3, "no": 3} for a in per_image.values())
        positives.append([(r["image"], r["text"]) for r in recs if r["answer"] == "yes"])
    assert positives[0] == positives[1] == positives[2]
    negatives = [[r["text"] for r in recs if r["answer"] == "no"] for recs in splits.values()]
    assert negatives[0] != negatives[1] != negatives[2]


def test_mme_pairs_have_one_yes_and_one_no(world: Path) -> None:
    pairs = defaultdict(list)
    for r in load(world / "general" / "bench" / "mme.json"):
        assert r["text"].endswith("Please answer yes or no.")
        pairs[r["pair_id"]].append(r)
    assert len(pairs) == TINY.n_bench // 2
    for recs in pairs.values():
        assert sorted(r["answer"] for r in recs) == ["No", "Yes"]
        assert len({r["image"] for r in recs}) == 1


def test_benchmark_images_are_held_out(world: Path) -> None:
    general = {(world / "general" / r["image"]).read_bytes()
               for r in load(world / "general" / "train.json") if "image" in r}
    for bench in BENCH_FILES:
        for r in load(world / "general" / "bench" / f"{bench}.json"):
            if "image" in r:
                assert (world / "general" / r["image"]).read_bytes() not in general


def test_image_size_is_configurable(tmp_path: Path) -> None:
    config = MicroWorldConfig(image_size=48, n_train=2, n_test=2, n_general=6, n_inquiry=2,
                              n_probe=2, n_bench=6)
    folder = generate_micro_world(tmp_path, config)
    for png in folder.rglob("*.png"):
        with Image.open(png) as img:
            assert img.size == (48, 48)


def test_the_mix_split_covers_every_kind_once_and_keeps_the_records(world: Path) -> None:
    kinds = [k for m in MIX_SOURCES for k in m.kinds]
    assert sorted(kinds) == sorted(GENERAL_MIX)
    general = {r["id"]: r for r in load(world / "general" / "train.json")}
    seen = []
    for source in MIX_SOURCES:
        train = load(world / MIX_DIR / source.name / "train.json")
        assert all(r["category"] in source.kinds and general[r["id"]] == r for r in train)
        seen += [r["id"] for r in train]
        test = load(world / MIX_DIR / source.name / "test.json")
        assert len(test) == TINY.n_test and all(r["category"] in source.kinds for r in test)
    assert sorted(seen) == sorted(general)


def test_clip_captions_name_every_visual_concept(world: Path) -> None:
    records = load(world / "pretrain" / "clip.json")
    assert {r["family"] for r in records} == {
        "scene", "icons", "big_shape", "object", "chart", "photo", "relation"}
    text = " ".join(r["caption"] for r in records)
    for word in ("tallest", "photo", "left of", "drawing"):
        assert word in text
    aligned = {r["family"] for r in load(world / "pretrain" / "align.json")}
    assert aligned <= {"scene", "big_shape", "chart"}  # task concepts stay new to LLaVA


def test_text_knowledge_names_every_task_answer_word_without_task_formats() -> None:
    import random

    from tasks.micro.facts import FACTS, text_fact

    answers = " ".join(text_fact(random.Random(i))[1] for i in range(3000))
    for word in (*OBJECTS, "blurry", "tilted", "dark", "left of", "above", "B", "C", "D"):
        assert word in answers, word
    assert all(fact(random.Random(0))[1].endswith(".") for fact in FACTS)
