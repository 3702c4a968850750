"""Shared fixtures: a tiny LLaVA folder and a tiny UCIT-layout data folder, built on the spot."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoTokenizer

from tasks.micro.model import (
    TinyConfig,
    build_clip,
    build_llava,
    image_processor,
    llava_processor,
    save_llava,
    train_tokenizer,
)
from tasks.suites.ucit import UCIT_TASKS

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230)}
TINY = TinyConfig(
    vision_hidden=32, vision_layers=1, projection_dim=32, text_hidden=64, text_layers=2,
    heads=2, intermediate=128, vocab_size=400,
)
CLIP = TinyConfig(vision_hidden=32, vision_layers=1, clip_text_layers=1, projection_dim=24,
                       heads=2)


def fixture_answer(task, colour: str, i: int) -> tuple[str, str]:
    """A question and answer of the task's type about a square of ``colour``."""
    if task.answer_type == "option":
        options = "\n".join(f"{chr(65 + k)}. {c}" for k, c in enumerate(COLOURS))
        letter = chr(65 + list(COLOURS).index(colour))
        return f"What colour is the square?\n{options}\n{task.instruction}", letter
    if task.answer_type == "caption":
        return task.instruction, f"a {colour} square"
    return f"What colour is the square?\n{task.instruction}", colour


def write_ucit_fixture(root: Path, n_train: int = 8, n_test: int = 4) -> Path:
    """A folder in UCIT's real layout: UCIT/<Task>/{train,test}.json, images in UCIT/datasets."""
    rng = random.Random(0)
    for task in UCIT_TASKS:
        folder = root / "UCIT" / task.folders[0]
        images = root / "UCIT" / "datasets" / task.folders[0]
        images.mkdir(parents=True, exist_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        for split, n in (("train", n_train), ("test", n_test)):
            records = []
            for i in range(n):
                colour = rng.choice(list(COLOURS))
                img = Image.new("RGB", (32, 32))
                ImageDraw.Draw(img).rectangle([8, 8, 24, 24], fill=COLOURS[colour])
                rel = f"{task.folders[0]}/{split}_{i}.png"
                img.save(root / "UCIT" / "datasets" / rel)
                question, answer = fixture_answer(task, colour, i)
                if split == "train":
                    records.append({"id": f"{split}{i}", "image": rel, "conversations": [
                        {"from": "human", "value": f"<image>\n{question}"},
                        {"from": "gpt", "value": answer}]})
                else:
                    records.append({"question_id": f"{split}{i}", "image": rel,
                                    "text": question, "answer": answer})
            (folder / f"{split}.json").write_text(json.dumps(records, indent=1))
    return root


def fixture_corpus() -> list[str]:
    texts = ["USER: ASSISTANT:"]
    for task in UCIT_TASKS:
        for colour in COLOURS:
            texts += list(fixture_answer(task, colour, 0))
    return texts * 20


def write_tiny_llava(folder: Path) -> Path:
    tokenizer = train_tokenizer(fixture_corpus(), TINY.vocab_size)
    return save_llava(build_llava(TINY, tokenizer), llava_processor(TINY, tokenizer), folder)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="session")
def ucit_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ucit_fixture(tmp_path_factory.mktemp("ucit"))


@pytest.fixture(scope="session")
def small_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small preset's world and base (built once per session, in under a minute idle)."""
    from tasks.micro.base import SMALL, micro_base_folder

    return micro_base_folder(tmp_path_factory.mktemp("micro-cache"), build=SMALL)


@pytest.fixture(scope="session")
def tiny_clip(tiny_llava: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLIP (untrained) on the fixture tokenizer, saved as a local CLIP folder."""
    folder = tmp_path_factory.mktemp("tiny_clip")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llava)
    torch.manual_seed(0)
    build_clip(CLIP, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor(CLIP).save_pretrained(folder)
    return folder


LLAMA_CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions.",
    "USER: What colour is the square? Answer the question using a single word or phrase. "
    "ASSISTANT: red green blue",
    "Answer with the option's letter from the given choices directly. A. red B. green C. blue",
    "Generate a brief caption for the image. a red square on a black background 3 12 [0.1, 0.25]",
]


def llama_tokenizer(legacy: bool = False, vocab_size: int = 400):
    """A Llama tokenizer (transformers' LlamaTokenizer: Metaspace, byte fallback, the legacy
    flag) over a BPE vocabulary trained by SentencePiece here, as llava-1.5's is, with the
    ``<image>`` token and LLaVA-1.5's pad token (unk)."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import generate_merges

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(LLAMA_CORPUS * 20), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    merges = generate_merges(vocab, pieces, skip_tokens={"<unk>", "<s>", "</s>"})
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, legacy=legacy,
                               extra_special_tokens={"image_token": "<image>"})
    tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


@pytest.fixture(autouse=True)
def fixed_git_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The code version runs record, pinned: a commit or an edit of the checkout while the
    tests run would otherwise make ``--resume`` refuse the runs the tests resume."""
    import cl_bench.running.environment

    monkeypatch.setattr(cl_bench.running.environment, "git_commit", lambda: "test-checkout")
