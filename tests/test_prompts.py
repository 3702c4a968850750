"""LLaVA-1.5 fidelity: the vicuna_v1 conversation, answer labels equal to tokenizing the whole
conversation (on a Llama tokenizer, legacy and not), pad-to-square images, truncation that
never cuts the image, and the micro world's prompts unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY, llama_tokenizer
from PIL import Image

from cl_bench.errors import CLBenchError
from cl_bench.models.backbones import get_backbone
from cl_bench.models.backbones.llava import VICUNA_SYSTEM, pad_to_square
from cl_bench.models.llava import (
    IGNORE_INDEX,
    ModelBundle,
    encode_conversation,
    encode_prompt,
    load_llava,
)
from tasks.micro.model import build_llava, llava_processor

TURNS = (("What colour is the square?\nAnswer with one word.", "red"),
         ("And the circle? 12 or [0.1, 0.25]?", "A blue circle, 12."))


def test_vicuna_v1_renders_llava_1_5s_conversation() -> None:
    vicuna = get_backbone("llava").conversation("vicuna_v1")
    text, spans = vicuna.render(TURNS, "<image>", "</s>")
    assert text == (
        f"{VICUNA_SYSTEM} USER: <image>\nWhat colour is the square?\nAnswer with one word. "
        "ASSISTANT: red</s>USER: And the circle? 12 or [0.1, 0.25]? ASSISTANT: "
        "A blue circle, 12.</s>"
    )
    assert [text[a:b] for a, b in spans] == [" red</s>", " A blue circle, 12.</s>"]
    prompt, none = vicuna.render((("Q?", None),), None, "</s>")
    assert prompt == f"{VICUNA_SYSTEM} USER: Q? ASSISTANT:" and none == []
    hf, _ = get_backbone("llava").conversation("llava_hf").render((("Q?", None),), "<image>", "")
    assert hf == "USER: <image>\nQ? ASSISTANT:"
    with pytest.raises(CLBenchError, match="Did you mean 'vicuna_v1'"):
        get_backbone("llava").conversation("vicuna_v2")


def llama_bundle(legacy: bool, conversation: str = "vicuna_v1") -> ModelBundle:
    tokenizer = llama_tokenizer(legacy)
    model = build_llava(TINY, tokenizer)
    return ModelBundle(model, llava_processor(TINY, tokenizer), Path("llama"), conversation)


@pytest.mark.parametrize("legacy", [True, False])
def test_labels_are_the_answers_of_the_whole_conversation_tokenized(legacy: bool) -> None:
    bundle = llama_bundle(legacy)
    tok, n = bundle.tokenizer, bundle.image_token_count
    ids, labels = encode_conversation(bundle, TURNS, True, 4096)
    text, _ = bundle.template.render(TURNS, "<image>" * n, tok.eos_token)
    whole = tok(text).input_ids
    whole = whole if whole[0] == tok.bos_token_id else [tok.bos_token_id, *whole]
    assert ids == whole  # one pass over the whole conversation, image tokens expanded
    assert ids.count(bundle.image_token_id) == n == 17  # 16 patches and the class token
    kept = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels, strict=True))
    assert tok.decode(kept) == "red</s> A blue circle, 12.</s>"
    prompt = encode_prompt(bundle, TURNS[0][0], True)
    assert ids[: len(prompt)] == prompt  # generation starts where training's answer starts


def test_micro_prompts_are_tokenized_as_before(tiny_llava: Path) -> None:
    """llava_hf on the micro BPE tokenizer: the ids and labels the micro world was built and
    measured with (prompt and each answer tokenized apart)."""
    bundle = load_llava(tiny_llava)
    tok, n = bundle.tokenizer, bundle.image_token_count
    ids, labels = [tok.bos_token_id], [IGNORE_INDEX]
    for i, (question, answer) in enumerate(TURNS):
        image = "<image>" * n + "\n" if i == 0 else ""
        prompt = tok(f"USER: {image}{question} ASSISTANT:", add_special_tokens=False).input_ids
        reply = [*tok(" " + answer, add_special_tokens=False).input_ids, tok.eos_token_id]
        ids, labels = ids + prompt + reply, labels + [IGNORE_INDEX] * len(prompt) + reply
    assert encode_conversation(bundle, TURNS, True, 4096) == (ids, labels)


def test_pad_to_square_fills_with_the_mean_colour() -> None:
    wide = Image.new("RGB", (4, 2), (255, 0, 0))
    square = pad_to_square(wide, (1, 2, 3))
    assert square.size == (4, 4)
    pixels = [[square.getpixel((x, y)) for x in range(4)] for y in range(4)]
    assert pixels[0] == pixels[3] == [(1, 2, 3)] * 4  # one row of fill above, one below
    assert pixels[1] == pixels[2] == [(255, 0, 0)] * 4
    tall = pad_to_square(Image.new("RGB", (1, 3), (0, 255, 0)), (9, 9, 9))
    assert [tall.getpixel((x, 1)) for x in range(3)] == [(9, 9, 9), (0, 255, 0), (9, 9, 9)]
    assert pad_to_square(square, (0, 0, 0)) is square


def test_pad_and_crop_differ_on_a_wide_image(tiny_llava: Path) -> None:
    bundle = load_llava(tiny_llava)
    image = Image.new("RGB", (64, 16), (200, 30, 30))
    processor = bundle.processor.image_processor
    llava = get_backbone("llava")
    padded = llava.pixel_values(processor, [image], "pad")
    fill = tuple(int(255 * m) for m in processor.image_mean)
    assert torch.equal(padded, processor([pad_to_square(image, fill)],
                                         return_tensors="pt")["pixel_values"])
    assert not torch.allclose(padded, llava.pixel_values(processor, [image], "crop"))
    with pytest.raises(CLBenchError, match="image_aspect_ratio='stretch'"):
        llava.pixel_values(processor, [image], "stretch")


def test_truncation_cuts_text_never_image_tokens(tiny_llava: Path) -> None:
    bundle = load_llava(tiny_llava)
    full, _ = encode_conversation(bundle, TURNS, True, 4096)
    ids, labels = encode_conversation(bundle, TURNS, True, len(full) - 3)
    assert ids == full[: len(full) - 3] and len(labels) == len(ids)
    start = full.index(bundle.image_token_id)
    with pytest.raises(CLBenchError, match=f"max_length {start + 4} cuts through the 17 image"):
        encode_conversation(bundle, TURNS, True, start + 4)
