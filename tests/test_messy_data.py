"""Messy real data, class by class: encodings, file shapes, values of the wrong type, image paths,
undecodable images and annotation-file variants. Each case asserts that the data check names the
file and the record or key, and that a run stops before training (no run folder at all)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from real_layouts import write_json, write_llavac_ft_root, write_ucit_root

from cl_bench.cli import main
from cl_bench.errors import CLBenchError
from cl_bench.registry import get_suite
from tasks.data_check import check_suite_data
from tasks.loaders import load_samples, read_records, read_reference_table

UCIT = get_suite("ucit")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return write_ucit_root(tmp_path / "data", n_train=4, n_test=3)


def clevr(root: Path, name: str = "test_3000.json") -> Path:
    return root / "UCIT" / "CLEVR" / name


def problems_of(root: Path, *tasks: str, fast: bool = False) -> list[str]:
    report = check_suite_data(UCIT, root, [UCIT.task(t) for t in tasks or ["CLEVR-Math"]], fast)
    return report._findings("problems")


def only_problem(root: Path, *tasks: str) -> str:
    (problem,) = problems_of(root, *tasks)
    return problem


# ---------------------------------------------------------------- encodings


def test_a_file_in_another_encoding_names_file_byte_offset_and_line(root: Path) -> None:
    records = read_records(clevr(root))
    records[1]["text"] = "Quelle couleur a le carré ?\n" + records[1]["text"]
    data = json.dumps(records, indent=1, ensure_ascii=False).encode("latin-1")
    clevr(root).write_bytes(data)
    offset, line = data.index(b"\xe9"), data[: data.index(b"\xe9")].count(b"\n") + 1
    problem = only_problem(root)
    assert f"CLEVR/test_3000.json: byte offset {offset} (line {line}): bytes e9 are not " \
           "valid UTF-8" in problem
    assert "must be UTF-8" in problem
    with pytest.raises(CLBenchError, match=f"byte offset {offset} "):
        load_samples(clevr(root), root)


@pytest.mark.parametrize("codec", ["utf-8-sig", "utf-16", "utf-32"])
def test_a_byte_order_mark_is_honoured(root: Path, codec: str) -> None:
    expected = read_records(clevr(root))
    clevr(root).write_bytes(json.dumps(expected, ensure_ascii=False).encode(codec))
    assert clevr(root).read_bytes()[:2] in (b"\xef\xbb", b"\xff\xfe")  # the mark is there
    assert read_records(clevr(root)) == expected
    assert problems_of(root) == []


@pytest.mark.parametrize(
    "content, message",
    [
        (json.dumps([{"id": 1}]).encode("utf-16-le"),
         r"byte offset 1 \(line 1\): a NUL byte.*UTF-16/32 without a byte-order mark"),
        (bytes(4096), r"byte offset 0 \(line 1\): a NUL byte.*incomplete download"),
        (b"", "the file is empty"),
        (b"  \n ", "the file is empty"),
        (b'{"data": [{"question_id": 1}], "info": 2}',
         "expected a JSON list of records, got an object with keys 'data', 'info' "
         r"\(its key 'data' holds a list"),
        (b'"just text"', "expected a JSON list of records, got text"),
    ],
    ids=["utf16-no-bom", "zero-filled", "empty", "blank", "object", "string"],
)
def test_unreadable_files_are_named(root: Path, content: bytes, message: str) -> None:
    clevr(root).write_bytes(content)
    problem = only_problem(root)
    assert "CLEVR/test_3000.json" in problem
    assert re.search(message, problem), problem


def test_json_lines_in_a_json_file_are_read(root: Path) -> None:
    records = read_records(clevr(root))
    clevr(root).write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert read_records(clevr(root)) == records
    assert problems_of(root) == []


def test_a_folder_where_a_data_file_belongs(root: Path) -> None:
    clevr(root).unlink()
    clevr(root).mkdir()
    problem = only_problem(root)
    assert "no test file" in problem and "test_3000.json is a folder, not a file" in problem
    with pytest.raises(CLBenchError, match="is a folder, expected a data file"):
        read_records(clevr(root))


# ---------------------------------------------------------------- values of the wrong type

BAD_TEST_VALUES = [
    ({"answer": None}, "key 'answer': expected text, got null"),
    ({"answer": ["red"]}, "key 'answer': expected text, got a list"),
    ({"answer": True}, "key 'answer': expected text, got true"),
    ({"answer": float("nan")}, "key 'answer': expected text, got the number nan"),
    ({"answers": ["red", None]}, r"key 'answers\[1\]': expected text, got null"),
    ({"answers": [{"answer_id": 1}]}, r"key 'answers\[0\]': an object without an 'answer'"),
    ({"answers": [{"answer": "  "}]}, r"key 'answers\[0\].answer': an empty reference"),
    ({"text": None}, "key 'text': expected text, got null"),
    ({"question_id": ["x"]}, "key 'question_id': expected a non-empty string or an integer"),
    ({"question_id": None}, "missing key 'id'"),
    ({"image": ["a.png", "b.png"]}, "key 'image': expected one relative path, got a list "
     r"\(records with several images are not supported\)"),
    ({"image": 7}, "key 'image': expected one relative path, got the number 7"),
    ({"image": "/data/CLEVR/x.png"}, "'/data/CLEVR/x.png' is an absolute path"),
    ({"image": "C:\\data\\x.png"}, "is an absolute path"),
    ({"image": "CLEVR/../../../x.png"}, "leads out of the image folder"),
]


@pytest.mark.parametrize("change, message", BAD_TEST_VALUES,
                         ids=[str(c) for c, _ in BAD_TEST_VALUES])
def test_unusable_values_name_file_record_and_key(
    root: Path, change: dict, message: str
) -> None:
    records = read_records(clevr(root))
    records[1].update(change)
    write_json(clevr(root), records)
    problem = only_problem(root)
    where = "record 1 (id CLEVR-1)" if "question_id" not in change else "record 1"
    assert "CLEVR/test_3000.json: 1 bad record(s): " + where in problem, problem
    assert re.search(message, problem), problem
    with pytest.raises(CLBenchError, match=message):  # what a run's loader says, the same
        load_samples(clevr(root), root / "UCIT" / "datasets")


def test_a_null_turn_in_a_training_conversation(root: Path) -> None:
    train = read_records(clevr(root, "train_4w.json"))
    train[2]["conversations"][1]["value"] = None
    write_json(clevr(root, "train_4w.json"), train)
    problem = only_problem(root)
    assert "train_4w.json: 1 bad record(s): record 2 (id CLEVR-train-2): key " \
           "'conversations[1].value': expected text, got null" in problem


def test_values_that_convert_are_read(root: Path) -> None:
    records = read_records(clevr(root))
    records[0].update(answer=3, question_id=17)  # a number answer and an integer id
    records[1]["image"] = records[1]["image"].replace("/", "\\")  # written on Windows
    records[2]["answers"] = [{"answer": 4}, "four"]
    write_json(clevr(root), records)
    assert problems_of(root) == []
    samples = load_samples(clevr(root), root / "UCIT" / "datasets")
    assert samples[0].id == "17" and samples[0].references == ("3",)
    assert samples[1].image.is_file()
    assert samples[2].references == ("4", "four")


# ---------------------------------------------------------------- images


def image_of(root: Path, record: int) -> Path:
    return root / "UCIT" / "datasets" / read_records(clevr(root))[record]["image"]


def test_images_that_are_not_there_say_what_is(root: Path) -> None:
    first, second = image_of(root, 0), image_of(root, 1)
    first.rename(first.with_name(first.name.upper()))  # exported from a case-blind system
    second.unlink()
    second.mkdir()
    problem = only_problem(root)
    assert "test_3000.json: 2 of 3 images missing" in problem
    assert f"(there is '{first.name.upper()}')" in problem
    assert "test_1.png (a folder, not a file)" in problem


def test_an_image_that_cannot_be_decoded_is_found_unless_fast(root: Path) -> None:
    broken = image_of(root, 2)
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 3])  # a partial download
    problem = only_problem(root)
    assert "test_3000.json: 1 of 3 images cannot be decoded, e.g. " in problem
    assert "UCIT/datasets/CLEVR/images/test/test_2.png (" in problem
    report = check_suite_data(UCIT, root, [UCIT.task("CLEVR-Math")], fast=True)
    assert report.ok and "not decoded (--fast)" in report.table()


def test_deep_and_transparent_images_pass(root: Path) -> None:
    deep = np.array([[0, 30000], [65535, 1000]], dtype=np.uint16)
    Image.fromarray(deep).save(image_of(root, 0))
    Image.new("LA", (8, 8), (100, 0)).save(image_of(root, 1))
    report = check_suite_data(UCIT, root, [UCIT.task("CLEVR-Math")])
    assert report.ok, report.table()
    assert "Images: 7 opened and decoded, 0 failed." in report.table()


# ---------------------------------------------------------------- annotation files


def coco(root: Path) -> Path:
    return root / "UCIT" / "Flickr30k" / "val_coco_type_3000.json"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("annotations"), "a COCO caption file needs 'annotations' "
         r"\(found keys 'images'\)"),
        (lambda d: d["annotations"][1].pop("caption"), r"annotations\[1\]: missing key 'caption'"),
        (lambda d: d["annotations"][0].pop("image_id"),
         r"annotations\[0\]: missing key 'image_id'"),
        (lambda d: d["annotations"][2].update(caption=None),
         r"annotations\[2\]: key 'caption' is null"),
        (lambda d: d["annotations"][2].update(caption=""),
         r"key 'annotations\[2\].caption': an empty reference"),
        (lambda d: d["images"][0].pop("file_name"), r"images\[0\]: missing key 'file_name'"),
        (lambda d: d.update(images={"0": "x"}), "key 'images': expected a list of objects"),
        (lambda d: d["annotations"].insert(0, "a caption"),
         r"annotations\[0\]: expected an object, got text"),
        (lambda d: d["images"][1].update(file_name="other/" + d["images"][0]["file_name"]),
         r"images\[0\] and images\[1\] are both named .* in different folders"),
    ],
    ids=["no-annotations", "no-caption", "no-image-id", "null-caption", "empty-caption",
         "no-file-name", "images-object", "string-annotation", "same-name"],
)
def test_coco_caption_variants_name_file_and_key(root: Path, change, message: str) -> None:
    data = json.loads(coco(root).read_text())
    change(data)
    write_json(coco(root), data)
    with pytest.raises(CLBenchError, match="val_coco_type_3000.json: " + message):
        read_reference_table(coco(root))
    problem = only_problem(root, "Flickr30k")
    assert re.search("Flickr30k/val_coco_type_3000.json: " + message, problem)


def test_captions_of_unknown_images_are_a_note(root: Path) -> None:
    data = json.loads(coco(root).read_text())
    data["annotations"].append({"image_id": 999, "id": 77, "caption": "a lost caption"})
    write_json(coco(root), data)
    report = check_suite_data(UCIT, root, [UCIT.task("Flickr30k")])
    assert report.ok
    assert any("1 caption(s) name an image id missing from 'images'" in n
               for n in report._findings("notes"))


def test_vqa_answer_variants(tmp_path: Path) -> None:
    table = read_reference_table(write_json(tmp_path / "a.json", {"annotations": [
        {"question_id": 7, "answers": "red"},  # one answer as text, not a list of letters
        {"question_id": 8, "answers": [{"answer": "blue"}, 2]},
        {"question_id": 9, "answers": []},
    ]}))
    assert table.by_id == {"7": ("red",), "8": ("blue", "2")}
    assert table.notes == ("1 row(s) without answers (ignored)",)
    cases = [
        ({"annotations": [{"question_id": 1, "answers": ["a", None]}]},
         r"annotations\[0\]\.answers\[1\]': expected text, got null"),
        ({"data": [{"answers": ["a"]}]}, r"data\[0\]: answers without a 'question_id' or an"),
        ({"data": [{"question_id": [1], "answers": ["a"]}]},
         r"key 'data\[0\]\.question_id': expected a non-empty string or an integer"),
        ([{"question_id": 1, "answer_bbox": [0.1, 0.2, 0.3]}],
         r"key 'row 0\.answer_bbox': expected \[x1, y1, x2, y2\], got a list"),
        ({"questions": []}, r"unrecognised reference file \(found keys 'questions'"),
        ({"annotations": {"1": "a"}}, "key 'annotations': expected a list of rows"),
    ]
    for data, message in cases:
        path = write_json(tmp_path / "b.json", data)
        with pytest.raises(CLBenchError, match=r"b\.json: .*" + message):
            read_reference_table(path)


def test_a_broken_inquiry_file_is_a_problem(tmp_path: Path) -> None:
    root = write_llavac_ft_root(tmp_path / "ft", n_train=2, n_test=2)
    inquiries = root / "llava665k" / "inquiries.json"
    inquiries.parent.mkdir(parents=True)
    inquiries.write_text(json.dumps([{"id": "q1", "text": None}]))
    suite = get_suite("llavac-ft")
    report = check_suite_data(suite, root, [suite.task("ArxivQA")])
    (problem,) = report.problems
    assert "inquiries.json: record 0 (id q1): key 'text': expected text, got null" in problem


# ---------------------------------------------------------------- a run stops before training


def run_argv(root: Path, out: Path) -> list[str]:
    return ["run", "--method", "finetune", "--suite", "ucit", "--data-root", str(root),
            "--model", str(out.parent / "no-model"), "--out", str(out), "--general", "none"]


@pytest.mark.parametrize("damage", ["undecodable image in the last task", "null reference",
                                    "latin-1 file"])
def test_a_run_on_messy_data_stops_before_anything_is_trained(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, damage: str
) -> None:
    if damage == "undecodable image in the last task":  # the case: found after stage 5
        train = read_records(root / "UCIT" / "Flickr30k" / "train_brief_4w.json")
        (root / "UCIT" / "datasets" / train[-1]["image"]).write_bytes(b"\x89PNG garbage")
        expected = ("train_brief_4w.json: 1 of 4 images cannot be decoded",
                    "Flickr30k/val/train_3.png")
    elif damage == "null reference":
        path = root / "UCIT" / "IconQA" / "test_3000.json"
        records = read_records(path)
        records[2]["answer"] = None
        write_json(path, records)
        expected = ("IconQA/test_3000.json: 1 bad record(s): record 2 (id IconQA-2): "
                    "key 'answer': expected text, got null",)
    else:
        path = root / "UCIT" / "ArxivQA" / "train_4w.json"
        path.write_bytes(path.read_text().replace("colour", "colóur").encode("latin-1"))
        expected = ("ArxivQA/train_4w.json: byte offset", "are not valid UTF-8")
    out = tmp_path / "run"
    assert main(run_argv(root, out)) == 2
    err = capsys.readouterr().err
    assert "so nothing was trained" in err and "no-model" not in err
    for part in expected:
        assert part in err, err
    assert not out.exists()  # no run folder, so no stage record and no checkpoint


def test_a_missing_java_stops_a_run_with_caption_tasks_only(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_java = tmp_path / "bin"
    no_java.mkdir()
    monkeypatch.setenv("PATH", str(no_java))
    out = tmp_path / "run"
    assert main(run_argv(root, out)) == 2
    err = capsys.readouterr().err
    assert "caption task(s) VizWiz-caption, Flickr30k: pycocoevalcap's PTB tokenizer and " \
           "METEOR run on Java, and no `java` is on PATH: install a Java runtime" in err
    assert not out.exists()
    assert problems_of(root, "CLEVR-Math", "ImageNet-R") == []  # no caption task: no Java needed


def test_the_data_check_command_reads_fast(root: Path, capsys: pytest.CaptureFixture) -> None:
    shutil.rmtree(root / "UCIT" / "datasets" / "ArxivQA")
    image_of(root, 0).write_bytes(b"not a png")
    argv = ["data", "check", "--suite", "ucit", "--data-root", str(root), "--order", "AC"]
    assert main([*argv, "--no-cache"]) == 2
    out = capsys.readouterr().out
    assert "cannot be decoded" in out and "images missing" in out
    assert main([*argv, "--fast"]) == 2  # missing images still found, decoding skipped
    out = capsys.readouterr().out
    assert "cannot be decoded" not in out and "images missing" in out
    assert "not decoded (--fast)" in out


def test_the_665k_splitter_never_makes_a_none_question() -> None:
    from tasks.llava665k import probe_records

    records = [
        {"id": "a", "conversations": [{"from": "human", "value": None},
                                      {"from": "gpt", "value": "Red."}]},
        {"id": "b", "conversations": [{"from": "human", "value": "Which colour?"},
                                      {"from": "gpt", "value": ["red"]}]},
        {"id": "c", "conversations": [{"from": "human", "value": "Which colour?"},
                                      {"from": "gpt", "value": "Red."}]},
    ]
    probes = probe_records("tqa", records, size=5)
    assert [p["source_id"] for p in probes] == ["c"]


def test_a_config_file_in_another_encoding(tmp_path: Path, capsys) -> None:
    config = tmp_path / "run.yaml"
    config.write_bytes("train:\n  learning_rate: 1.0e-4  # café\n".encode("latin-1"))
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{config}: byte offset 37 (line 2): bytes e9 are not valid UTF-8" in err


def test_records_asked_without_their_image_are_noted(root: Path) -> None:
    records = read_records(clevr(root))
    records[0]["img"] = records[0].pop("image")  # an image under another key is never read
    records[0]["text"] = "<image>\n" + records[0]["text"]
    write_json(clevr(root), records)
    report = check_suite_data(UCIT, root, [UCIT.task("CLEVR-Math")])
    assert report.ok  # a run may start (text-only questions exist), but the user is told
    notes = report._findings("notes")
    assert any("test_3000.json: 1 of 3 records have no image and are asked without one, e.g. "
               "ids CLEVR-0" in n for n in notes)
    assert any("test_3000.json: 1 record(s) name no image but have an '<image>' token, e.g. "
               "ids CLEVR-0" in n for n in notes)
