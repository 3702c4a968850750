"""Pretraining data of the base build, the analogues of what LLaVA-1.5 starts from.

- ``generate_clip``: image-caption pairs naming every visual concept of the world (object classes
  in their renditions, chart bars, icon counts, photo qualities, spatial relations, scenes), on
  which the tiny CLIP is trained contrastively, as CLIP was trained on web image-text pairs.
- ``generate_text_chat``: text-only conversations (``tasks.micro.facts``) that make the tiny
  language model a chat model knowing the world's words before it sees an image (Vicuna).
- ``generate_alignment``: brief captions of the images the general mix shows (scenes, big
  shapes, charts), on which only the projector is trained (LLaVA's stage 1 on LCS-558K). Object
  renditions, degraded photos and spatial relations are left out, so that the tasks built on them
  stay new to the LLaVA model.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from tasks.micro import draw
from tasks.micro.facts import text_fact
from tasks.micro.general import quota_plan
from tasks.micro.records import Example
from tasks.micro.scene import Thing, article, describe, join, phrase, place, random_scene
from tasks.micro.tasks import related_cells
from tasks.micro.world import (
    BAR_LEVELS,
    COLOURS,
    DEGRADATIONS,
    OBJECTS,
    SHAPES,
    STYLES,
    number_word,
    rng_for,
)

Pair = Callable[[random.Random, int], Example]
BRIEF_PROMPTS = (
    "Describe the image briefly.",
    "Give a short description of the image.",
    "What is in the image? Answer briefly.",
)
STYLE_CAPTIONS = {
    "filled": "a drawing of {}",
    "outline": "an outline of {}",
    "striped": "a striped drawing of {}",
    "noisy": "a noisy picture of {}",
}


def scene_pair(rng: random.Random, size: int) -> Example:
    things = random_scene(rng, rng.randint(1, 5))
    return Example("", image=draw.scene_image(things, size, rng), caption=describe(things))


def icons_pair(rng: random.Random, size: int) -> Example:
    colour = rng.choice(list(COLOURS))
    shapes = rng.sample(SHAPES, rng.randint(1, 3))
    kinds = [(colour, s) for s in shapes for _ in range(rng.randint(1, 4))][:7]
    things = place(kinds, rng)
    return Example("", image=draw.scene_image(things, size, rng), caption=describe(things))


def big_shape_pair(rng: random.Random, size: int) -> Example:
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    return Example("", image=draw.big_shape_image(colour, shape, size, rng),
                   caption=f"a big {colour} {shape}")


def object_pair(rng: random.Random, size: int) -> Example:
    name, style, colour = rng.choice(OBJECTS), rng.choice(STYLES), rng.choice(list(COLOURS))
    caption = STYLE_CAPTIONS[style].format(phrase(1, colour, name))
    return Example("", image=draw.object_image(name, colour, style, size, rng), caption=caption)


def chart_caption(heights: list[float], colours: list[str]) -> str:
    tallest = colours[heights.index(max(heights))]
    shortest = colours[heights.index(min(heights))]
    return (f"a bar chart of {number_word(len(colours))} bars, {join(colours)}; the {tallest} "
            f"bar is the tallest and the {shortest} bar is the shortest")


def chart_pair(rng: random.Random, size: int) -> Example:
    n = rng.randint(2, 4)
    heights, colours = rng.sample(BAR_LEVELS, n), rng.sample(list(COLOURS), n)
    return Example("", image=draw.chart_image(heights, colours, size, rng),
                   caption=chart_caption(heights, colours))


def photo_pair(rng: random.Random, size: int) -> Example:
    colour, shape, quality = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(DEGRADATIONS)
    return Example("", image=draw.photo_image(colour, shape, quality, size, rng),
                   caption=f"a {quality} photo of {phrase(1, colour, shape)}")


def relation_pair(rng: random.Random, size: int) -> Example:
    relation = rng.choice(("left", "above"))
    kinds = rng.sample([(c, s) for c in COLOURS for s in SHAPES], 2)
    (ra, ca), (rb, cb) = related_cells(rng, relation)
    things = [Thing(*kinds[0], ra, ca), Thing(*kinds[1], rb, cb)]
    a, b = (f"{article(k[0])} {k[0]} {k[1]}" for k in kinds)
    caption = f"{a} left of {b}" if relation == "left" else f"{a} above {b}"
    return Example("", image=draw.scene_image(things, size, rng), caption=caption)


CLIP_FAMILIES: dict[str, tuple[float, Pair]] = {
    "scene": (0.15, scene_pair),
    "icons": (0.15, icons_pair),
    "big_shape": (0.05, big_shape_pair),
    "object": (0.3, object_pair),
    "chart": (0.15, chart_pair),
    "photo": (0.1, photo_pair),
    "relation": (0.1, relation_pair),
}
ALIGNMENT_FAMILIES = ("scene", "big_shape", "chart")


def generate_pairs(seed: int, n: int, size: int, families: tuple[str, ...],
                   stream: str) -> Iterator[Example]:
    """``n`` image-caption pairs of ``families`` in CLIP_FAMILIES proportions."""
    weights = {f: CLIP_FAMILIES[f][0] for f in families}
    for i, family in enumerate(quota_plan(n, weights, rng_for(seed, stream, "plan"))):
        ex = CLIP_FAMILIES[family][1](rng_for(seed, stream, i), size)
        ex.extra = {"family": family}
        yield ex


def generate_clip(seed: int, n: int, size: int) -> Iterator[Example]:
    """The tiny CLIP's image-caption pairs: every visual concept of the world."""
    return generate_pairs(seed, n, size, tuple(CLIP_FAMILIES), "clip")


def generate_alignment(seed: int, n: int, size: int) -> Iterator[Example]:
    """Brief-caption conversations for the projector's alignment (LLaVA's stage 1)."""
    for i, ex in enumerate(generate_pairs(seed, n, size, ALIGNMENT_FAMILIES, "align")):
        ex.question = rng_for(seed, "align-prompt", i).choice(BRIEF_PROMPTS)
        ex.answer = ex.caption
        yield ex


def generate_text_chat(seed: int, n: int) -> Iterator[Example]:
    """Text-only conversations: the tiny language model's own training (the Vicuna analogue)."""
    for i in range(n):
        question, answer = text_fact(rng_for(seed, "chat", i))
        yield Example(question, answer)
