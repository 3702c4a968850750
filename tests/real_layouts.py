"""Small data folders in exactly the real suites' layouts, with generated images.

Each writer makes a few records per task under a root, with the real folder and file names and
their variants (``test_3000.json``, ``train_4w.json``, ``val_coco_type_3000.json``, ``VizWiz``
for VizWiz-caption, CoIN's ``val.json`` and ``test_1.json``, IconQA's "0. ..." index options,
grounding boxes with ``answer_bbox`` and ``size``, VQA answer lists), so the real code paths
run in CI. Questions are about the colour of a square, which the tiny test model can learn.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230)}
WORD = "Answer the question using a single word or phrase."
OPTION = "Answer with the option's letter from the given choices directly."
CAPTION = "Generate a brief caption for the image."
REC = "Please provide the bounding box coordinate of the region this sentence describes:"
FIGUREQA = "Please answer the question and provide the correct option letter at the end."
BOX = "[0.25, 0.25, 0.75, 0.75]"  # where draw_square puts the square

# A question maker: (colour, index) -> (question, answer, extra test-record keys).
Maker = Callable[[str, int], tuple[str, str, dict]]


def draw_square(path: Path, colour: str) -> None:
    """A 32x32 image with a square of ``colour`` in its middle half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (32, 32), (250, 250, 250))
    ImageDraw.Draw(image).rectangle([8, 8, 23, 23], fill=COLOURS[colour])
    image.save(path)


def write_json(path: Path, data: object) -> Path:
    """Indented JSON, so a line number points into a record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path


def conversation(rid: str, image: str | None, question: str, answer: str) -> dict:
    """A LLaVA conversation record (text-only when ``image`` is None)."""
    record: dict = {"id": rid}
    if image:
        record["image"] = image
        question = f"<image>\n{question}"
    record["conversations"] = [
        {"from": "human", "value": question}, {"from": "gpt", "value": answer},
    ]
    return record


# ---------------------------------------------------------------- question makers


def word_question(instruction: str = WORD) -> Maker:
    return lambda colour, i: (f"What colour is the square?\n{instruction}", colour, {})


def letter_question(instruction: str = OPTION) -> Maker:
    def make(colour: str, i: int) -> tuple[str, str, dict]:
        options = "\n".join(f"{chr(65 + k)}. {c}" for k, c in enumerate(COLOURS))
        letter = chr(65 + list(COLOURS).index(colour))
        return f"What colour is the square?\n{options}\n{instruction}", letter, {}
    return make


def index_question(colour: str, i: int) -> tuple[str, str, dict]:
    """IconQA's reference test format: options "0. ...", answer the index."""
    options = "\n".join(f"{k}. {c}" for k, c in enumerate(COLOURS))
    index = str(list(COLOURS).index(colour))
    return f"What colour is the square?\nChoices:\n{options}\n{OPTION}", index, {}


def figureqa_question(colour: str, i: int) -> tuple[str, str, dict]:
    asked = list(COLOURS)[i % len(COLOURS)]
    answer = "A" if asked == colour else "B"
    return f"Is the square {asked}?\nA. Yes\nB. No\n{FIGUREQA}", answer, {}


def caption_question(colour: str, i: int) -> tuple[str, str, dict]:
    return CAPTION, f"a {colour} square", {}


def vqa_question(colour: str, i: int) -> tuple[str, str, dict]:
    """A VQA record with ten human answers (VQA-style objects), most of them the colour."""
    answers = [colour] * 8 + ["white", "dark " + colour]
    extra = {"answers": [{"answer": a, "answer_id": k + 1} for k, a in enumerate(answers)]}
    return f"What colour is the square?\n{WORD}", colour, extra


def grounding_question(colour: str, i: int) -> tuple[str, str, dict]:
    extra = {"answer_bbox": BOX, "size": [32, 32]}
    return f"{REC} the {colour} square", BOX, extra


# ---------------------------------------------------------------- generic task writer


def write_task(
    folder: Path, image_root: Path, image_dir: str, make: Maker, files: tuple[str, str],
    n_train: int, n_test: int, seed: int = 0, image_suffix: str = ".png",
) -> list[dict]:
    """``files`` = (train file, test file) in ``folder``; images under ``image_root/image_dir``.

    Train records are conversations, test records ``{question_id, image, text, answer}`` plus
    the maker's extra keys. Returns the test records.
    """
    rng = random.Random(f"{seed}-{folder.name}")
    tests: list[dict] = []
    for split, n, name in (("train", n_train, files[0]), ("test", n_test, files[1])):
        records = []
        for i in range(n):
            colour = rng.choice(list(COLOURS))
            image = f"{image_dir}/{split}_{i}{image_suffix}"
            draw_square(image_root / image, colour)
            question, answer, extra = make(colour, i)
            if split == "train":
                records.append(conversation(f"{folder.name}-{split}-{i}", image, question, answer))
            else:
                records.append({"question_id": f"{folder.name}-{i}", "image": image,
                                "text": question, "answer": answer, **extra})
        write_json(folder / name, records)
        if split == "test":
            tests = records
    return tests


def write_coco_captions(path: Path, tests: list[dict]) -> None:
    """A ``val_coco_type_3000.json``: positional image ids, basenames, several captions each."""
    images, annotations = [], []
    for k, record in enumerate(tests, 1):
        images.append({"id": k, "file_name": Path(record["image"]).name})
        for caption in (record["answer"], record["answer"].replace("a ", "one ", 1)):
            annotations.append({"image_id": k, "id": len(annotations) + 1, "caption": caption})
    write_json(path, {"images": images, "annotations": annotations})


# ---------------------------------------------------------------- the suites


def write_ucit_root(root: Path, n_train: int = 6, n_test: int = 3) -> Path:
    """UCIT/<Task>/ with the reference file names; images under UCIT/datasets/<source>/..."""
    base, images = root / "UCIT", root / "UCIT" / "datasets"
    tasks = (  # folder, image sub-folder, maker, (train file, test file)
        ("ImageNet-R", "ImageNet-R/test/n01443537", word_question(),
         ("train.json", "test_3000.json")),
        ("ArxivQA", "ArxivQA/images", letter_question(), ("train_4w.json", "test_3000.json")),
        ("VizWiz", "VizWiz/val", caption_question, ("train.json", "test_3000.json")),
        ("IconQA", "IconQA/iconqa_data/iconqa/test/choose_txt", index_question,
         ("train.json", "test_3000.json")),
        ("CLEVR", "CLEVR/images/test", word_question(), ("train_4w.json", "test_3000.json")),
        ("Flickr30k", "Flickr30k/val", caption_question, ("train_brief_4w.json", "test_3000.json")),
    )
    for folder, image_dir, make, files in tasks:
        tests = write_task(base / folder, images, image_dir, make, files, n_train, n_test)
        if make is caption_question:
            write_coco_captions(base / folder / "val_coco_type_3000.json", tests)
    return root


def write_coin_root(root: Path, n_train: int = 6, n_test: int = 3) -> Path:
    """Instructions_Original/<Task>/ as in the CoIN repository; images under cl_dataset/."""
    base, images = root / "Instructions_Original", root / "cl_dataset"
    tasks = (
        ("ScienceQA", "ScienceQA/test", letter_question(), "test.json"),
        ("TextVQA", "TextVQA/train_images", word_question(), "val.json"),
        ("ImageNet", "ImageNet/val", word_question(), "test.json"),
        ("GQA", "GQA/images", word_question(), "test.json"),
        ("VizWiz", "VizWiz/val", word_question(), "test.json"),
        ("Grounding", "COCO2014/train2014", grounding_question, "test.json"),
        ("VQAv2", "COCO2014/val2014", vqa_question, "test.json"),
        ("OCRVQA", "OCR-VQA/images", word_question(), "test_1.json"),
    )
    for folder, image_dir, make, test_file in tasks:
        tests = write_task(base / folder, images, image_dir, make, ("train.json", test_file),
                           n_train, n_test, image_suffix=".jpg")
        if folder == "TextVQA":  # TextVQA's own annotation file, ten answers per question
            data = [{"question_id": t["question_id"], "answers": [t["answer"]] * 10}
                    for t in tests]
            write_json(images / "TextVQA" / "TextVQA_0.5.1_val.json", {"data": data})
    return root


def write_llavac_ft_root(root: Path, n_train: int = 6, n_test: int = 3) -> Path:
    """LLaVA-c/<Task>/{train,test}.json with images under LLaVA-c/datasets/."""
    base, images = root / "LLaVA-c", root / "LLaVA-c" / "datasets"
    tasks = (
        ("IconQA", "IconQA/iconqa_data/iconqa/test", index_question),
        ("Super-CLEVR", "Super-CLEVR/images", word_question()),
        ("CLEVR-Math", "CLEVR/images/test", word_question()),
        ("FigureQA", "FigureQA/validation1/png", figureqa_question),
        ("ArxivQA", "ArxivQA/images", letter_question()),
    )
    for folder, image_dir, make in tasks:
        write_task(base / folder, images, image_dir, make, ("train.json", "test.json"),
                   n_train, n_test)
    return root


# LLaVA-665k: one image path per source, as in llava_v1_5_mix665k.json.
MIX_IMAGE_DIRS = {
    "coco": "coco/train2017", "ocr": "ocr_vqa/images", "textvqa": "textvqa/train_images",
    "gqa": "gqa/images", "vg": "vg/VG_100K",
}


def mix665k_records(root: Path, per_source: dict[str, int]) -> list[dict]:
    """Records shaped like llava_v1_5_mix665k.json's (multi-turn, short-answer prompts,
    captions and boxes), ``per_source[split]`` of each, interleaved; images drawn under root."""
    rng = random.Random(665)
    records = []
    for split, n in per_source.items():
        for i in range(n):
            colour = rng.choice(list(COLOURS))
            rid = f"{split}{i:06d}"
            if split == "tqa":
                records.append(conversation(rid, None, f"Tell me about the colour {colour}.",
                                            f"{colour.capitalize()} is a colour."))
                continue
            image = f"{MIX_IMAGE_DIRS[split]}/{rid}.jpg"
            draw_square(root / image, colour)
            question, answer = {
                "textvqa": ("Provide a one-sentence caption for the provided image.",
                            f"A {colour} square on a white background."),
                "vg": (f"{REC} the {colour} square.", BOX),
            }.get(split, (f"What colour is the square?\n{WORD}", colour))
            record = conversation(rid, image, question, answer)
            record["conversations"] += [
                {"from": "human", "value": "Is it a circle?"}, {"from": "gpt", "value": "No"},
            ]
            records.append(record)
    rng.shuffle(records)
    return records


def write_llava665k_root(root: Path, per_source: dict[str, int] | None = None) -> Path:
    """A data root holding a small ``llava_v1_5_mix665k.json`` and its images (not split)."""
    per_source = per_source or {s: 6 for s in ("tqa", "coco", "ocr", "textvqa", "gqa", "vg")}
    write_json(root / "llava_v1_5_mix665k.json", mix665k_records(root, per_source))
    return root
