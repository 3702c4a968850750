"""The real suites (ucit, coin, llava665k, llavac-ft): definitions, loaders on fixture folders in
their real layouts, the data check (good and broken data), the llava665k splitter, the scorer each
task uses, and a quick end-to-end run per suite through the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from real_layouts import (
    BOX,
    write_coin_root,
    write_json,
    write_llava665k_root,
    write_llavac_ft_root,
    write_ucit_root,
)

from cl_bench.cli import main
from cl_bench.errors import CLBenchError
from cl_bench.registry import get_suite
from tasks.data_check import check_suite_data, require_valid_data
from tasks.llava665k import EXPECTED_COUNTS, split_of, split_records, write_splits
from tasks.loaders import Sample, load_test_samples, read_records
from tasks.scoring import SCORERS, score_task
from tasks.suites.llava665k import PAPER_GENERAL_BENCHMARKS
from tasks.suites.ucit import CAPTION, OPTION, WORD

REAL_SUITES = ("ucit", "coin", "llava665k", "llavac-ft")


# ---------------------------------------------------------------- fixture folders


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One fixture data root per real suite (llava665k's already split)."""
    base = tmp_path_factory.mktemp("real")
    mix = write_llava665k_root(base / "llava665k")
    write_splits(mix, probe_size=4)
    return {
        "ucit": write_ucit_root(base / "ucit"),
        "coin": write_coin_root(base / "coin"),
        "llava665k": mix,
        "llavac-ft": write_llavac_ft_root(base / "llavac-ft"),
    }


def task_test_samples(suite_name: str, task: str, root: Path) -> list[Sample]:
    suite = get_suite(suite_name)
    return load_test_samples(suite.task_files(suite.task(task), root))


# ---------------------------------------------------------------- definitions


@pytest.mark.parametrize("name", REAL_SUITES)
def test_every_real_suite_is_well_formed(name: str) -> None:
    suite = get_suite(name)
    letters = [t.letter for t in suite.tasks]
    assert len(set(letters)) == len(letters), "letters for --order must be unique"
    assert len({t.name for t in suite.tasks}) == len(suite.tasks)
    assert all(t.answer_type in SCORERS.names() and t.folders for t in suite.tasks)
    assert suite.data_source and suite.generator is None and suite.default_model is None
    assert suite.resolve_order("".join(letters)) == list(suite.tasks)


def test_ucit_matches_the_spec() -> None:
    ucit = get_suite("ucit")
    assert "".join(t.letter for t in ucit.tasks) == "RAVICF"
    assert ucit.task_names() == [
        "ImageNet-R", "ArxivQA", "VizWiz-caption", "IconQA", "CLEVR-Math", "Flickr30k"]
    kinds = {t.name: (t.instruction, t.answer_type) for t in ucit.tasks}
    assert kinds["ArxivQA"] == kinds["IconQA"] == (OPTION, "option")
    assert kinds["ImageNet-R"] == kinds["CLEVR-Math"] == (WORD, "word")
    assert kinds["VizWiz-caption"] == kinds["Flickr30k"] == (CAPTION, "caption")
    assert {t.expected_test for t in ucit.tasks} == {3000}
    assert min(t.expected_train for t in ucit.tasks) == 23998
    assert max(t.expected_train for t in ucit.tasks) == 40000
    for order in ("AIRFCV", "IFRCAV"):  # HiDe-LLaVA, Table 4
        assert "".join(t.letter for t in ucit.resolve_order(order)) == order
    assert [t.name for t in ucit.resolve_order("RA")] == ["ImageNet-R", "ArxivQA"]


def test_coin_matches_the_spec() -> None:
    coin = get_suite("coin")
    assert coin.task_names() == [
        "ScienceQA", "TextVQA", "ImageNet", "GQA", "VizWiz", "Grounding", "VQAv2", "OCR-VQA"]
    types = {t.name: t.answer_type for t in coin.tasks}
    assert types == {
        "ScienceQA": "option", "TextVQA": "vqa", "ImageNet": "word", "GQA": "word",
        "VizWiz": "vqa", "Grounding": "bbox", "VQAv2": "vqa", "OCR-VQA": "word"}
    grounding = coin.task("Grounding")
    assert grounding.instruction == (
        "Please provide the bounding box coordinate of the region this sentence describes:")
    train = {t.name: t.expected_train for t in coin.tasks}
    assert train.pop("TextVQA") == 34602 and train.pop("VizWiz") == 20523
    assert set(train.values()) == {20000} and {t.expected_test for t in coin.tasks} == {3000}
    assert coin.tasks_dir == "Instructions_Original"


def test_llava665k_and_llavac_ft_match_the_spec() -> None:
    pretrain = get_suite("llava665k")
    assert pretrain.task_names() == ["tqa", "coco", "ocr", "textvqa", "gqa", "vg"]
    assert sum(t.expected_train for t in pretrain.tasks) == 665298
    assert pretrain.inquiry_file == "llava665k/inquiries.json"
    assert not pretrain.general_benchmarks  # lmms-eval's real tasks need the user's HF cache
    assert {"pope", "mme", "mmmu_val"} <= set(PAPER_GENERAL_BENCHMARKS)
    ft = get_suite("llavac-ft")
    assert ft.task_names() == ["IconQA", "Super-CLEVR", "CLEVR-Math", "FigureQA", "ArxivQA"]
    assert ft.task("FigureQA").instruction == (
        "Please answer the question and provide the correct option letter at the end.")
    assert ft.task("IconQA").instruction == ft.task("ArxivQA").instruction == OPTION
    assert {t.expected_test for t in ft.tasks} == {2000}
    assert not ft.general_benchmarks


def test_bad_orders_are_named() -> None:
    ucit = get_suite("ucit")
    with pytest.raises(CLBenchError, match="unknown task"):
        ucit.resolve_order("RAX")
    with pytest.raises(CLBenchError, match="twice"):
        ucit.resolve_order("RR")


def test_list_shows_the_real_suites(capsys: pytest.CaptureFixture) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in REAL_SUITES:
        assert f"  {name}:" in out
    assert "Grounding [R]" in out


# ---------------------------------------------------------------- loaders on the real layouts


def test_reference_variants_are_read(roots: dict[str, Path]) -> None:
    caption = task_test_samples("ucit", "VizWiz-caption", roots["ucit"])
    assert all(len(s.references) == 2 for s in caption)  # from val_coco_type_3000.json
    assert all(s.references[0].endswith("square") for s in caption)
    iconqa = task_test_samples("ucit", "IconQA", roots["ucit"])
    assert {s.references[0] for s in iconqa} <= {"0", "1", "2"} and "0. red" in iconqa[0].question
    textvqa = task_test_samples("coin", "TextVQA", roots["coin"])
    assert all(len(s.references) == 10 for s in textvqa)  # TextVQA_0.5.1_val.json
    vqav2 = task_test_samples("coin", "VQAv2", roots["coin"])
    assert all(len(s.references) == 10 and "white" in s.references for s in vqav2)
    grounding = task_test_samples("coin", "Grounding", roots["coin"])
    assert all(s.references == (BOX,) and s.extra["size"] == [32, 32] for s in grounding)


def test_caption_references_match_by_image_not_position(tmp_path: Path) -> None:
    root = write_ucit_root(tmp_path, n_train=1, n_test=3)
    coco = tmp_path / "UCIT" / "Flickr30k" / "val_coco_type_3000.json"
    data = json.loads(coco.read_text())
    data["images"].reverse()
    write_json(coco, data)
    samples = task_test_samples("ucit", "Flickr30k", root)
    tests = read_records(tmp_path / "UCIT" / "Flickr30k" / "test_3000.json")
    assert [s.references[0] for s in samples] == [t["answer"] for t in tests]


# ---------------------------------------------------------------- each task's scorer


@pytest.mark.parametrize("name", ["ucit", "coin", "llavac-ft"])
def test_each_task_scores_its_references_and_rejects_junk(
    name: str, roots: dict[str, Path]
) -> None:
    suite = get_suite(name)
    for task in suite.tasks:
        if task.answer_type == "caption":
            continue  # the caption metrics have their own tests (test_scoring.py)
        samples = task_test_samples(name, task.name, roots[name])
        refs = {s.id: list(s.references) for s in samples}
        right = {s.id: s.references[0] for s in samples}
        assert score_task(task.answer_type, right, refs).score == 100.0, task.name
        for junk in ("", "    ", "no idea at all", "[0.25, 0.25, 0.75"):
            wrong = dict.fromkeys(refs, junk)
            assert score_task(task.answer_type, wrong, refs).score == 0.0, (task.name, junk)


def test_adversarial_answers_on_real_tasks(roots: dict[str, Path]) -> None:
    arxiv = task_test_samples("ucit", "ArxivQA", roots["ucit"])[0]
    letter = arxiv.references[0]
    other = "A" if letter != "A" else "B"
    refs = {arxiv.id: list(arxiv.references)}

    def option(prediction: str) -> float:
        return score_task("option", {arxiv.id: prediction}, refs).score

    assert option(f"The answer is {letter}.") == option(f"({letter})") == 100.0
    assert option(letter.lower()) == 100.0
    assert option(f"{letter} or {other}") == option(f"{letter}{other}") == 0.0
    iconqa = task_test_samples("ucit", "IconQA", roots["ucit"])[0]
    index = iconqa.references[0]
    as_letter = chr(65 + int(index))
    for prediction in (index, as_letter, f"{index}. something"):
        got = score_task("option", {iconqa.id: prediction}, {iconqa.id: [index]}).score
        assert got == 100.0, prediction
    box = task_test_samples("coin", "Grounding", roots["coin"])[0]
    boxes = {box.id: list(box.references)}
    assert score_task("bbox", {box.id: "It is at [0.26, 0.25, 0.75, 0.74]."}, boxes).score == 100
    assert score_task("bbox", {box.id: "[0.5, 0.5, 1.0, 1.0]"}, boxes).score == 0.0
    vqa = task_test_samples("coin", "VQAv2", roots["coin"])[0]
    answer = vqa.references[0]
    assert score_task("vqa", {vqa.id: answer.upper()}, {vqa.id: list(vqa.references)}).score == 100
    # one of ten humans said "white": official VQA accuracy (1 * 0 + 9 * 1/3) / 10 = 0.3
    assert score_task("vqa", {vqa.id: "white"}, {vqa.id: list(vqa.references)}).score == (
        pytest.approx(30.0))


# ---------------------------------------------------------------- data check: good data


@pytest.mark.parametrize("name", REAL_SUITES)
def test_data_check_passes_on_each_fixture(name: str, roots: dict[str, Path]) -> None:
    report = check_suite_data(get_suite(name), roots[name])
    assert report.ok, report.table()
    table = report.table()
    assert "Data check OK." in table
    for task in get_suite(name).tasks:
        assert task.name in table
    assert any("published" in note for note in report._findings("notes"))


def test_data_check_prints_what_it_found(roots: dict[str, Path], capsys) -> None:
    assert main(["data", "check", "--suite", "ucit", "--data-root", str(roots["ucit"])]) == 0
    out = capsys.readouterr().out
    assert "UCIT/VizWiz" in out and "test_3000.json + val_coco_type_3000.json" in out
    assert "train_brief_4w.json" in out and "train_4w.json" in out
    assert main(["data", "check", "--suite", "coin", "--data-root", str(roots["coin"]),
                 "--order", "TO"]) == 0
    out = capsys.readouterr().out
    assert "val.json + TextVQA_0.5.1_val.json" in out and "test_1.json" in out
    assert "ScienceQA" not in out


def test_data_check_reads_the_environment_variable(
    roots: dict[str, Path], capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLBENCH_DATA_ROOT", str(roots["llavac-ft"]))
    assert main(["data", "check", "--suite", "llavac-ft"]) == 0
    assert str(roots["llavac-ft"]) in capsys.readouterr().out
    monkeypatch.delenv("CLBENCH_DATA_ROOT")
    assert main(["data", "check", "--suite", "coin"]) == 2
    assert "give --data-root PATH" in capsys.readouterr().err


# ---------------------------------------------------------------- data check: broken data


@pytest.fixture
def broken_ucit(tmp_path: Path) -> Path:
    """UCIT with a missing task folder, a JSON syntax error on line 7, records without
    conversations and two missing images."""
    root = write_ucit_root(tmp_path / "data")
    ucit = root / "UCIT"
    shutil.rmtree(ucit / "IconQA")
    lines = (ucit / "ArxivQA" / "train_4w.json").read_text().split("\n")
    lines.insert(6, "  oops,")
    (ucit / "ArxivQA" / "train_4w.json").write_text("\n".join(lines))
    train = read_records(ucit / "ImageNet-R" / "train.json")
    for record in train[1:3]:
        del record["conversations"]
    write_json(ucit / "ImageNet-R" / "train.json", train)
    for record in read_records(ucit / "CLEVR" / "test_3000.json")[:2]:
        (ucit / "datasets" / record["image"]).unlink()
    return root


def test_data_check_reports_every_problem(broken_ucit: Path) -> None:
    report = check_suite_data(get_suite("ucit"), broken_ucit)
    assert not report.ok
    by_task = {t.task.name: t for t in report.tasks}
    assert "task folder not found" in by_task["IconQA"].problems[0]
    assert "UCIT/IconQA" in by_task["IconQA"].problems[0]
    (syntax,) = by_task["ArxivQA"].problems
    assert "ArxivQA/train_4w.json:7: invalid JSON" in syntax
    (bad,) = by_task["ImageNet-R"].problems
    assert "2 bad record(s)" in bad and "record 1 (id ImageNet-R-train-1)" in bad
    assert "expected key 'conversations' or 'text'" in bad
    (missing,) = by_task["CLEVR-Math"].problems
    assert "2 of 3 images missing" in missing and "CLEVR/images/test/test_0.png" in missing
    assert by_task["CLEVR-Math"].missing_images == 2
    assert by_task["Flickr30k"].ok and by_task["VizWiz-caption"].ok
    assert report.problem_count() == 4
    table = report.table()
    assert "FAILED: 4 problem(s)" in table and table.count("1 problem(s)") == 4


def test_data_check_command_fails_on_broken_data(broken_ucit: Path, capsys) -> None:
    assert main(["data", "check", "--suite", "ucit", "--data-root", str(broken_ucit)]) == 2
    captured = capsys.readouterr()
    assert "train_4w.json:7: invalid JSON" in captured.out
    assert "data check failed: 4 problem(s)" in captured.err


def test_unusable_test_references_and_duplicate_ids(tmp_path: Path) -> None:
    root = write_coin_root(tmp_path)
    folder = root / "Instructions_Original"
    science = read_records(folder / "ScienceQA" / "test.json")
    science[0]["answer"] = "the second one"
    science[1]["question_id"] = science[2]["question_id"]
    write_json(folder / "ScienceQA" / "test.json", science)
    grounding = read_records(folder / "Grounding" / "test.json")
    grounding[0]["answer_bbox"] = "[0.1, 0.2"
    write_json(folder / "Grounding" / "test.json", grounding)
    report = check_suite_data(get_suite("coin"), root)
    problems = report._findings("problems")
    assert any("question id(s) used more than once" in p for p in problems)
    assert any("ScienceQA: test.json: 1 test record(s) without a usable option" in p
               for p in problems)
    assert any("Grounding: test.json: 1 test record(s) without a usable bbox" in p
               for p in problems)


def test_missing_data_root_and_files(tmp_path: Path) -> None:
    report = check_suite_data(get_suite("coin"), tmp_path / "nowhere")
    assert not report.ok and "is not a folder" in report.problems[0]
    root = write_llavac_ft_root(tmp_path / "ft")
    (root / "LLaVA-c" / "FigureQA" / "test.json").unlink()
    shutil.rmtree(root / "LLaVA-c" / "datasets" / "ArxivQA")
    report = check_suite_data(get_suite("llavac-ft"), root)
    problems = report._findings("problems")
    assert any("FigureQA: no test file" in p and "test_2000.json" in p for p in problems)
    assert any("ArxivQA: train.json: 6 of 6 images missing" in p for p in problems)
    with pytest.raises(CLBenchError, match="nothing was trained.*Expected layout"):
        require_valid_data(get_suite("llavac-ft"), root, get_suite("llavac-ft").tasks)


def test_a_run_refuses_broken_data_before_loading_the_model(
    broken_ucit: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    code = main(["run", "--method", "finetune", "--suite", "ucit", "--data-root",
                 str(broken_ucit), "--model", str(tmp_path / "no-model"), "--out", str(out),
                 "--general", "none"])
    assert code == 2
    err = capsys.readouterr().err
    assert "has 4 problem(s), so nothing was trained" in err
    assert "clbench data check --suite ucit" in err and "no-model" not in err
    assert not (out / "records.jsonl").exists()


# ---------------------------------------------------------------- the llava665k splitter


def test_split_rule_on_a_file_of_the_same_shape(tmp_path: Path) -> None:
    counts = {"tqa": 3, "coco": 5, "ocr": 2, "textvqa": 2, "gqa": 4, "vg": 3}
    root = write_llava665k_root(tmp_path, counts)
    source = read_records(root / "llava_v1_5_mix665k.json")
    result = write_splits(root, probe_size=2)
    assert result.counts == counts and sum(result.counts.values()) == len(source)
    prefixes = {"coco": "coco/", "ocr": "ocr_vqa/", "textvqa": "textvqa/", "gqa": "gqa/",
                "vg": "vg/"}
    for split, n in counts.items():
        train = read_records(root / "llava665k" / split / "train.json")
        assert len(train) == n
        assert train == [r for r in source if split_of(r, "") == split]  # the file's order
        if split == "tqa":
            assert all("image" not in r for r in train)
        else:
            assert all(r["image"].startswith(prefixes[split]) for r in train)
        probe = read_records(root / "llava665k" / split / "test.json")
        assert len(probe) == min(2, n) and len({p["question_id"] for p in probe}) == len(probe)
        assert all("<image>" not in p["text"] for p in probe)
    vg_probe = read_records(root / "llava665k" / "vg" / "test.json")
    assert all(p["answer"] == BOX for p in vg_probe)
    inquiries = read_records(root / "llava665k" / "inquiries.json")
    assert len(inquiries) == 3 and all("image" not in q and q["text"] for q in inquiries)
    assert "(differs)" in result.table()
    assert sum(EXPECTED_COUNTS.values()) == 665298


def test_split_errors_are_named(tmp_path: Path) -> None:
    records = [{"id": "a", "conversations": []}, {"id": "b", "image": "sam/1.jpg"}]
    with pytest.raises(CLBenchError, match=r"record 1: image 'sam/1.jpg' has none of"):
        split_records(records)
    with pytest.raises(CLBenchError, match="llava_v1_5_mix665k.json not found"):
        write_splits(tmp_path)


def test_split_command_then_check(tmp_path: Path, capsys) -> None:
    root = write_llava665k_root(tmp_path)
    assert main(["data", "check", "--suite", "llava665k", "--data-root", str(root)]) == 2
    assert "clbench data split665k" in capsys.readouterr().out
    assert main(["data", "split665k", "--data-root", str(root), "--probe-size", "3"]) == 0
    assert "665,298" in capsys.readouterr().out
    assert main(["data", "check", "--suite", "llava665k", "--data-root", str(root)]) == 0


# ---------------------------------------------------------------- a quick run per suite


def quick_run(suite: str, root: Path, model: Path, out: Path, *extra: str) -> dict:
    """A --quick run through the command line; returns summary.json."""
    code = main([
        "run", "--suite", suite, "--data-root", str(root), "--model", str(model),
        "--out", str(out), "--quick", "--general", "none", "--set", "probes=false",
        "--set", "eval.max_new_tokens=4", "--set", "train.max_steps=1", *extra,
    ])
    assert code == 0
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("name", REAL_SUITES)
def test_quick_multitask_run_on_each_suite(
    name: str, roots: dict[str, Path], tiny_llava: Path, tmp_path: Path
) -> None:
    """Every task trained (one joint stage) and evaluated on its fixture, through the CLI."""
    suite = get_suite(name)
    summary = quick_run(name, roots[name], tiny_llava, tmp_path / "run", "--method", "multitask")
    assert summary["order"] == suite.task_names()
    matrix = (tmp_path / "run" / "matrix.csv").read_text().splitlines()
    assert matrix[0] == ",".join(["stage", "trained_on", *suite.task_names()])
    assert len(matrix) == 3
    for task in suite.tasks:
        rows = read_records(tmp_path / "run" / "predictions" / "stage_1" / f"{task.name}.jsonl")
        assert rows and all(r["references"] for r in rows)


def test_quick_sequential_run_with_a_letter_order(
    roots: dict[str, Path], tiny_llava: Path, tmp_path: Path
) -> None:
    summary = quick_run("coin", roots["coin"], tiny_llava, tmp_path / "run",
                        "--method", "finetune", "--order", "RT")
    assert summary["order"] == ["Grounding", "TextVQA"]
    assert summary["Avg"] is not None
    rows = read_records(tmp_path / "run" / "predictions" / "stage_2" / "TextVQA.jsonl")
    assert all(len(r["references"]) == 10 for r in rows)
    final = read_records(tmp_path / "run" / "records.jsonl")[-1]
    assert set(final["details"]["TextVQA"]) == {"vqa_official", "vqa_min3"}
    assert final["scores"]["TextVQA"] == final["details"]["TextVQA"]["vqa_official"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| Avg | Last (MFN) | MFT |" in report
    assert "## Task metrics beside the scores (stage 2)" in report
    assert "| TextVQA | " in report and "vqa_official" in report and "vqa_min3" in report


# ---------------------------------------------------------------- reference files and records


def test_reference_tables_of_each_kind(tmp_path: Path) -> None:
    from tasks.loaders import parse_record, read_reference_table

    vqa = write_json(tmp_path / "vqa.json", {"annotations": [
        {"question_id": 7, "answers": [{"answer": "red"}, {"answer": "red"}]}]})
    assert read_reference_table(vqa).by_id == {"7": ("red", "red")}
    vizwiz = write_json(tmp_path / "vizwiz.json", [
        {"image": "VizWiz_val_1.jpg", "answers": [{"answer": "a can"}]}])
    assert read_reference_table(vizwiz).by_image == {"VizWiz_val_1.jpg": ("a can",)}
    with pytest.raises(CLBenchError, match="unrecognised reference file"):
        read_reference_table(write_json(tmp_path / "odd.json", {"x": 1}))
    with pytest.raises(CLBenchError, match="no references found"):
        read_reference_table(write_json(tmp_path / "empty.json", []))
    record = {"question_id": 3, "text": "<image>\nWhere?", "answer_bbox": [0.1, 0.2, 0.3, 0.4]}
    sample = parse_record(record, "r", tmp_path, check_images=False)
    assert sample.question == "Where?" and sample.references == ("[0.1, 0.2, 0.3, 0.4]",)


def test_coin_file_variants_with_answers_win(tmp_path: Path) -> None:
    root = write_coin_root(tmp_path, n_train=1, n_test=2)
    folder = root / "Instructions_Original"
    questions = read_records(folder / "TextVQA" / "val.json")
    write_json(folder / "TextVQA" / "test.json", [
        {k: v for k, v in q.items() if k != "answer"} for q in questions])
    assert get_suite("coin").task_files(get_suite("coin").task("TextVQA"), root).test.name == (
        "val.json")
    grounding = read_records(folder / "Grounding" / "test.json")
    write_json(folder / "Grounding" / "test_5k.json", grounding)
    write_json(folder / "Grounding" / "test.json", [
        {k: v for k, v in g.items() if k not in ("answer", "answer_bbox")} for g in grounding])
    samples = task_test_samples("coin", "Grounding", root)
    assert all(s.references == (BOX,) for s in samples)  # from test_5k.json, by question id
    report = check_suite_data(get_suite("coin"), root)
    assert report.ok, report.table()
    assert "test.json + test_5k.json" in report.table()
