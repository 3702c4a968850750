"""The six task generators of ``ucit-micro``, in UCIT's order, with UCIT's instructions.

Each task draws one example from a per-example random stream and a *slot*: a value (answer
letter, class, ...) assigned from a balanced, shuffled plan over the split, so that answers are
balanced. Every task needs something the general mix does not teach: new object words
(ImageNet-R), option letters (ArxivQA, IconQA), caption phrasing about image quality
(VizWiz-caption) and spatial relations (Flickr30k), subtraction (CLEVR-Math).

The option tasks list a fixed set of options in a fixed order for each question kind (ArxivQA's
four chart colours, IconQA's counts one to four and its four shapes), so that the answer's letter
depends on the image alone. Real multiple-choice questions shuffle their options, and answering
them is an in-context lookup (the letter written before the option that matches the image). A
language model of the micro base's size does not learn that lookup within the base build's
budget (``benchmarks/micro_lookup.py``; ``docs/micro_world.md``), so shuffled options would leave
both tasks at chance whatever the method.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from tasks.micro import draw
from tasks.micro.records import Example
from tasks.micro.scene import Thing, article, phrase, place, plural, random_kind
from tasks.micro.world import (
    BAR_LEVELS,
    COLOURS,
    DEGRADATIONS,
    GRID,
    LETTERS,
    OBJECTS,
    SHAPES,
    STYLES,
    balanced,
    bar_colour,
    number_word,
    rng_for,
)
from tasks.suites.ucit import UCIT_TASKS

INSTRUCTIONS = {t.name: t.instruction for t in UCIT_TASKS}
ANSWER_TYPES = {t.name: t.answer_type for t in UCIT_TASKS}
Maker = Callable[[random.Random, tuple, str, int], Example]


@dataclass(frozen=True)
class MicroTask:
    """A task: its UCIT name, the balanced slots of a split and the example maker."""

    name: str
    slots: tuple[tuple, ...]
    make: Maker

    @property
    def instruction(self) -> str:
        return INSTRUCTIONS[self.name]

    @property
    def answer_type(self) -> str:
        return ANSWER_TYPES[self.name]


def generate(task: MicroTask, seed: int, split: str, n: int, size: int) -> Iterator[Example]:
    """``n`` examples of ``task``'s ``split``, deterministic in ``seed``."""
    plan = balanced(n, task.slots, rng_for(seed, task.name, split, "plan"))
    for i, slot in enumerate(plan):
        yield task.make(rng_for(seed, task.name, split, i), slot, split, size)


def options_block(options: Sequence[str], split: str, index_style: bool) -> str:
    """'A. x\\nB. y...' (or '0. x\\n1. y...' for IconQA-style test files)."""
    labels = [str(i) for i in range(len(options))] if index_style else LETTERS
    return "\n".join(f"{label}. {o}" for label, o in zip(labels, options, strict=False))


# 1. ImageNet-R: an object class in a rendition style -> the class name.
def imagenet_r(rng: random.Random, slot: tuple, split: str, size: int) -> Example:
    name, style = slot
    colour = rng.choice(list(COLOURS))
    question = f"What is the object in the image?\n{INSTRUCTIONS['ImageNet-R']}"
    return Example(question, name, draw.object_image(name, colour, style, size, rng))


# 2. ArxivQA: a bar chart of the four chart colours, a question with options A-D -> a letter.
CHART_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")  # the options, in order
CHART_QUESTIONS = {
    "tallest": "Which bar is the tallest?",
    "shortest": "Which bar is the shortest?",
    "leftmost": "What is the colour of the leftmost bar?",
    "rightmost": "What is the colour of the rightmost bar?",
}


def chart(rng: random.Random, n_bars: int) -> tuple[list[float], list[str]]:
    """Distinct bar heights (at least one level apart) and distinct chart colours."""
    heights = rng.sample(BAR_LEVELS, n_bars)
    return heights, rng.sample(CHART_COLOURS, n_bars)


def arxivqa(rng: random.Random, slot: tuple, split: str, size: int) -> Example:
    position, kind = slot
    while True:  # draw charts until the slot's colour is the answer (one in four on average)
        heights, colours = chart(rng, rng.choice((2, 3, 3, 4, 4)))
        if bar_colour(kind, heights, colours) == CHART_COLOURS[position]:
            break
    question = (f"{CHART_QUESTIONS[kind]}\n{options_block(CHART_COLOURS, split, False)}\n"
                f"{INSTRUCTIONS['ArxivQA']}")
    return Example(question, LETTERS[position], draw.chart_image(heights, colours, size, rng))


# 3. VizWiz-caption: a degraded photo of one shape -> a caption.
PHOTO_CAPTIONS = {
    "blurry": ("a blurry photo of {}", "a blurred picture of {}", "{}, out of focus"),
    "tilted": ("a tilted photo of {}", "a crooked picture of {}", "{} photographed at an angle"),
    "dark": ("a dark photo of {}", "a dim picture of {}", "{} in low light"),
}


def vizwiz_caption(rng: random.Random, slot: tuple, split: str, size: int) -> Example:
    degradation, shape = slot
    colour = rng.choice(list(COLOURS))
    thing = phrase(1, colour, shape)
    refs = tuple(t.format(thing) for t in PHOTO_CAPTIONS[degradation])
    image = draw.photo_image(colour, shape, degradation, size, rng)
    return Example(INSTRUCTIONS["VizWiz-caption"], refs[0], image, refs)


# 4. IconQA: icons of one colour to count or compare -> a letter (an index in test files).
ICON_OPTIONS: dict[str, tuple[str, ...]] = {  # the options of each question kind, in order
    "count": tuple(number_word(k) for k in range(1, 5)),
    "most": tuple(plural(s) for s in SHAPES),
}


def icon_count(rng: random.Random, position: int) -> tuple[list[str], str]:
    """``position + 1`` icons of one shape among up to three others; shapes and question."""
    target = rng.choice(SHAPES)
    others = [s for s in SHAPES if s != target]
    kinds = [target] * (position + 1) + [rng.choice(others) for _ in range(rng.randint(0, 3))]
    return kinds, f"How many {plural(target)} are there?"


def icon_most(rng: random.Random, position: int) -> tuple[list[str], str]:
    """Most icons of ``SHAPES[position]``, fewer of one or two other shapes."""
    most_of = SHAPES[position]
    shapes = [most_of, *rng.sample([s for s in SHAPES if s != most_of], rng.choice((1, 2)))]
    most = rng.randint(2, 4)
    counts = [most] + [rng.randint(1, most - 1) for _ in shapes[1:]]
    kinds = [s for s, k in zip(shapes, counts, strict=True) for _ in range(k)]
    return kinds, "Which shape is there the most of?"


def iconqa(rng: random.Random, slot: tuple, split: str, size: int) -> Example:
    position, kind = slot
    shapes, q = (icon_count if kind == "count" else icon_most)(rng, position)
    colour = rng.choice(list(COLOURS))
    things = place([(colour, s) for s in shapes], rng)
    index_style = split == "test"
    block = options_block(ICON_OPTIONS[kind], split, index_style)
    question = f"{q}\n{block}\n{INSTRUCTIONS['IconQA']}"
    label = str(position) if index_style else LETTERS[position]
    return Example(question, label, draw.scene_image(things, size, rng))


# 5. CLEVR-Math: "Subtract all red objects. How many objects are left?" -> a number word.
def clevr_math(rng: random.Random, slot: tuple, split: str, size: int) -> Example:
    left, attribute = slot
    removed = rng.randint(1, 5 - left)
    colour, shape = random_kind(rng)
    if attribute == "colour":
        hit = [(colour, rng.choice(SHAPES)) for _ in range(removed)]
        keep = [random_kind(rng, [c for c in COLOURS if c != colour]) for _ in range(left)]
        text = f"Subtract all {colour} objects."
    elif attribute == "shape":
        hit = [(rng.choice(list(COLOURS)), shape) for _ in range(removed)]
        keep = [random_kind(rng, shapes=[s for s in SHAPES if s != shape]) for _ in range(left)]
        text = f"Subtract all {plural(shape)}."
    else:
        hit = [(colour, shape)] * removed
        keep = []
        while len(keep) < left:
            kind = random_kind(rng)
            if kind != (colour, shape):
                keep.append(kind)
        text = f"Subtract all {colour} {plural(shape)}."
    question = f"{text} How many objects are left?\n{INSTRUCTIONS['CLEVR-Math']}"
    image = draw.scene_image(place(hit + keep, rng), size, rng)
    return Example(question, number_word(left), image)


# 6. Flickr30k: two objects in a spatial relation -> a caption.
RELATION_CAPTIONS = {
    "left": ("{a} left of {b}", "{b} right of {a}", "{a} to the left of {b}"),
    "above": ("{a} above {b}", "{b} below {a}", "{a} on top of {b}"),
}


def related_cells(rng: random.Random, relation: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """Cells of a first and second object: first clearly left of (or above) the second."""
    near = rng.randrange(GRID)
    other = min(GRID - 1, max(0, near + rng.choice((-1, 0, 1))))
    first = rng.randrange(GRID - 2)
    second = rng.randint(first + 2, GRID - 1)
    if relation == "left":
        return (near, first), (other, second)
    return (first, near), (second, other)


def flickr30k(rng: random.Random, slot: tuple, split: str, size: int) -> Example:
    (relation,) = slot
    a_kind = random_kind(rng)
    b_kind = random_kind(rng)
    while b_kind == a_kind:
        b_kind = random_kind(rng)
    (ra, ca), (rb, cb) = related_cells(rng, relation)
    things = [Thing(*a_kind, ra, ca), Thing(*b_kind, rb, cb)]
    a, b = (f"{article(k[0])} {k[0]} {k[1]}" for k in (a_kind, b_kind))
    refs = tuple(t.format(a=a, b=b) for t in RELATION_CAPTIONS[relation])
    return Example(INSTRUCTIONS["Flickr30k"], refs[0], draw.scene_image(things, size, rng), refs)


MICRO_TASKS: tuple[MicroTask, ...] = (
    MicroTask("ImageNet-R", tuple(itertools.product(OBJECTS, STYLES)), imagenet_r),
    MicroTask("ArxivQA", tuple(itertools.product(range(4), CHART_QUESTIONS)), arxivqa),
    MicroTask("VizWiz-caption", tuple(itertools.product(DEGRADATIONS, SHAPES)), vizwiz_caption),
    MicroTask("IconQA", tuple(itertools.product(range(4), ("count", "most"))), iconqa),
    MicroTask("CLEVR-Math", tuple(itertools.product(range(1, 5), ("colour", "shape", "both"))),
              clevr_math),
    MicroTask("Flickr30k", (("left",), ("above",)), flickr30k),
)
