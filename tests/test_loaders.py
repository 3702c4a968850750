import json
from pathlib import Path

import pytest
from PIL import Image

from cl_bench.errors import CLBenchError
from tasks.loaders import load_samples


def write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data, indent=1))
    return path


def test_reads_conversations_and_test_records(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    conv = write(tmp_path / "train.json", [
        {"id": 1, "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A"},
            {"from": "human", "value": "And?"}, {"from": "gpt", "value": "B"}]},
        {"id": "t", "conversations": [
            {"from": "human", "value": "Text only"}, {"from": "gpt", "value": "Yes."}]},
    ])
    samples = load_samples(conv, tmp_path)
    assert samples[0].turns == (("What?", "A"), ("And?", "B"))
    assert samples[0].image == tmp_path / "a.png" and samples[1].image is None
    test = write(tmp_path / "test.json", [
        {"question_id": "q1", "image": "a.png", "text": "Q", "answer": "x",
         "references": ["x", "y"], "pair_id": 3}])
    (sample,) = load_samples(test, tmp_path)
    assert sample.question == "Q" and sample.references == ("x", "y")
    assert sample.extra == {"pair_id": 3}


def test_jsonl_and_syntax_errors_name_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('[\n {"id": 1,\n  "text": "a"\n  "answer": "b"}\n]')
    with pytest.raises(CLBenchError, match=r"bad.json:4: invalid JSON"):
        load_samples(bad, tmp_path)
    lines = tmp_path / "x.jsonl"
    lines.write_text('{"id": 1, "text": "a", "answer": "b"}\n{"id": 2,\n')
    with pytest.raises(CLBenchError, match=r"x.jsonl:2: invalid JSON"):
        load_samples(lines, tmp_path)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"image": "a.png", "text": "q"}, "missing key 'id'"),
        ({"id": 7}, "record 0 \\(id 7\\): expected key 'conversations' or 'text'"),
        ({"id": 7, "conversations": [{"from": "human", "value": "q"}]}, "at least a human"),
        ({"id": 7, "conversations": [{"from": "gpt", "value": "q"}, {"from": "human"}]},
         "'human' then a 'gpt'"),
        ({"id": 7, "image": "missing.png", "text": "q"}, "image not found: .*missing.png"),
    ],
)
def test_bad_records_are_named(tmp_path: Path, record: dict, message: str) -> None:
    file = write(tmp_path / "d.json", [record])
    with pytest.raises(CLBenchError, match=message):
        load_samples(file, tmp_path)


def test_missing_file_and_non_list(tmp_path: Path) -> None:
    with pytest.raises(CLBenchError, match="data file not found"):
        load_samples(tmp_path / "nope.json", tmp_path)
    with pytest.raises(CLBenchError, match="expected a JSON list"):
        load_samples(write(tmp_path / "o.json", {"a": 1}), tmp_path)
