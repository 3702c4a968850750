"""Shared fixtures, built on the spot under fixed seeds (whatever ran before): a tiny UCIT-layout
data folder, a tiny LLaVA (untrained) and the same LLaVA taught the fixture's answer formats.

Every test also starts from the same global random state, so that no outcome depends on which
tests ran before it.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

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


def write_ucit_fixture(root: Path, n_train: int = 8, n_test: int = 12) -> Path:
    """A folder in UCIT's real layout: UCIT/<Task>/{train,test}.json, images in UCIT/datasets."""
    rng = random.Random(0)
    for task in UCIT_TASKS:
        folder = root / "UCIT" / task.folders[0]
        images = root / "UCIT" / "datasets" / task.folders[0]
        images.mkdir(parents=True, exist_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        asd = []  # SEFE's answer-style-diversified copy of the train file (its default name)
        for split, n in (("train", n_train), ("test", n_test)):
            records = []
            for i in range(n):
                colour = rng.choice(list(COLOURS))
                size = rng.randint(10, 18)  # a square of its own size and place
                x, y = rng.randint(2, 30 - size), rng.randint(2, 30 - size)
                img = Image.new("RGB", (32, 32))
                ImageDraw.Draw(img).rectangle([x, y, x + size, y + size], fill=COLOURS[colour])
                rel = f"{task.folders[0]}/{split}_{i}.png"
                img.save(root / "UCIT" / "datasets" / rel)
                question, answer = fixture_answer(task, colour, i)
                if split == "train":
                    records.append({"id": f"{split}{i}", "image": rel, "conversations": [
                        {"from": "human", "value": f"<image>\n{question}"},
                        {"from": "gpt", "value": answer}]})
                    asd.append(records[-1] if i % 2 else {**records[-1], "conversations": [
                        {"from": "human", "value": f"<image>\nIs the square {colour}? Yes or no."},
                        {"from": "gpt", "value": "Yes"}]})
                else:
                    records.append({"question_id": f"{split}{i}", "image": rel,
                                    "text": question, "answer": answer})
            (folder / f"{split}.json").write_text(json.dumps(records, indent=1))
        (folder / ASD_FILE).write_text(json.dumps(asd, indent=1))
    write_inquiries(root / INQUIRY_FILE)
    return root



ASD_FILE = "train_x20.json"
INQUIRY_FILE = "general/inquiries.json"
INQUIRIES = ("What colour is the square?", "Generate a brief caption for the image.",
             "Describe the colour.", "Which colour is it?")


def write_inquiries(path: Path) -> Path:
    """Unlabeled text-only inquiries (LLaVA-c's UIR set; the suite ``ucit-fixture`` names it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"id": str(i), "text": q} for i, q in enumerate(INQUIRIES * 2)]))
    return path


def fixture_corpus() -> list[str]:
    texts = ["USER: ASSISTANT:"]
    for task in UCIT_TASKS:
        for colour in COLOURS:
            texts += list(fixture_answer(task, colour, 0))
    return texts * 20


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Python's, numpy's and torch's global RNGs seeded for the block, then restored."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def write_tiny_llava(folder: Path) -> Path:
    """The tiny LLaVA with weights from seed 0, whatever the global random state."""
    tokenizer = train_tokenizer(fixture_corpus(), TINY.vocab_size)
    with seeded(0):
        model = build_llava(TINY, tokenizer)
    return save_llava(model, llava_processor(TINY, tokenizer), folder)


def write_tiny_clip(folder: Path) -> Path:
    """A tiny CLIP (untrained, seed 0) on the fixture tokenizer, saved as a local CLIP folder."""
    tokenizer = train_tokenizer(fixture_corpus(), TINY.vocab_size)
    with seeded(0):
        clip = build_clip(CLIP, tokenizer)
    clip.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor(CLIP).save_pretrained(folder)
    return folder


# The tasks the taught model answers from the start: word and caption formats. It has never
# seen the option-letter tasks (ArxivQA, IconQA), which a stage then has to learn.
TAUGHT_TASKS = "RVCF"


def teach_llava(untrained: Path, data_root: Path, folder: Path) -> Path:
    """The tiny LLaVA trained (full weights, seed 0) on the fixture's TAUGHT_TASKS until it
    answers their test questions right: a model whose answers depend on the input."""
    from cl_bench.config import ModelConfig, TrainConfig
    from cl_bench.models.llava import load_llava
    from cl_bench.running.training import train_model
    from tasks.loaders import load_samples
    from tasks.suites.ucit import UCIT

    bundle = load_llava(untrained, ModelConfig(device="cpu"))  # a run's prompt format
    bundle.model.requires_grad_(True)  # loaded frozen
    samples = []
    for task in UCIT.resolve_order(TAUGHT_TASKS):
        files = UCIT.task_files(task, data_root)
        samples += load_samples(files.train, files.image_root)
    cfg = TrainConfig(learning_rate=3e-3, batch_size=16, max_steps=42, warmup_ratio=0.0,
                      max_length=512)
    with seeded(0):
        train_model(bundle.model, bundle, samples, cfg, folder.with_name("teach_trainer"), 0)
    return save_llava(bundle.model, bundle.processor, folder)


@pytest.fixture(autouse=True)
def same_random_state_for_every_test() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="session")
def taught_llava(
    tiny_llava: Path, ucit_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The tiny LLaVA taught the word and caption tasks of ``ucit_root`` (see TAUGHT_TASKS)."""
    return teach_llava(tiny_llava, ucit_root, tmp_path_factory.mktemp("taught") / "llava")


@pytest.fixture(scope="session")
def small_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small preset's world and base (built once per session, in under a minute idle)."""
    from tasks.micro.base import SMALL, micro_base_folder

    return micro_base_folder(tmp_path_factory.mktemp("micro-cache"), build=SMALL)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def ucit_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ucit_fixture(tmp_path_factory.mktemp("ucit"))


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


@pytest.fixture(scope="session", autouse=True)
def fixed_git_commit() -> Iterator[None]:
    """The code version runs record, pinned: a commit or an edit of the checkout while the
    tests run would otherwise make ``--resume`` refuse the runs the tests resume. Session-wide,
    so that a test's ``monkeypatch.undo()`` leaves it in place."""
    import cl_bench.running.environment

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cl_bench.running.environment, "git_commit", lambda: "test-checkout")
        yield
