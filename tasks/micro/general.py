"""The general instruction mix (the LLaVA-665k analogue), text-only inquiries and open probes.

Answers are full sentences. The mix teaches the vocabulary the tasks use (colours, shapes,
counts, positions, chart words) but none of the tasks' instructions or answer formats.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from tasks.micro import draw
from tasks.micro.records import Example
from tasks.micro.scene import (
    Kind,
    Thing,
    article,
    count_sentence,
    describe,
    join,
    phrase,
    plural,
    random_scene,
    unique,
)
from tasks.micro.world import (
    BAR_LEVELS,
    COLOURS,
    DEGRADATIONS,
    SHAPES,
    balanced,
    number_word,
    rng_for,
)

Maker = Callable[[random.Random, int], Example]

DESCRIBE_PROMPTS = (
    "What do you see in the image?",
    "Describe the image.",
    "What is in this picture?",
    "What does the image show?",
    "Can you describe this image?",
)
YES_NO_SUFFIX = " Please answer yes or no."


def scene_with(rng: random.Random, low: int, high: int,
               ok: Callable[[list[Thing]], bool] = lambda t: True) -> list[Thing]:
    """A random scene of ``low``-``high`` things satisfying ``ok``."""
    while True:
        things = random_scene(rng, rng.randint(low, high))
        if ok(things):
            return things


def describe_scene(rng: random.Random, size: int) -> Example:
    things = scene_with(rng, 1, 5)
    return Example(rng.choice(DESCRIBE_PROMPTS), f"The image shows {describe(things)}.",
                   draw.scene_image(things, size, rng),
                   caption=describe(things))


def colour_of(rng: random.Random, size: int) -> Example:
    things = scene_with(rng, 1, 4, lambda t: bool(unique(t, lambda x: x.shape)))
    t = rng.choice(unique(things, lambda x: x.shape))
    return Example(f"What colour is the {t.shape}?", f"The {t.shape} is {t.colour}.",
                   draw.scene_image(things, size, rng),
                   caption=describe(things))


def shape_of(rng: random.Random, size: int) -> Example:
    things = scene_with(rng, 1, 4, lambda t: bool(unique(t, lambda x: x.colour)))
    t = rng.choice(unique(things, lambda x: x.colour))
    return Example(f"What shape is the {t.colour} object?",
                   f"The {t.colour} object is {article(t.shape)} {t.shape}.",
                   draw.scene_image(things, size, rng),
                   caption=describe(things))


def count_all(rng: random.Random, size: int) -> Example:
    things = scene_with(rng, 1, 5)
    noun = rng.choice(("shape", "object"))
    question = f"How many {noun}s are there in the image?"
    return Example(question, count_sentence(len(things), noun, noun + "s"),
                   draw.scene_image(things, size, rng),
                   caption=describe(things))


def count_shape(rng: random.Random, size: int) -> Example:
    things = scene_with(rng, 1, 5)
    shape = rng.choice([t.shape for t in things] + list(SHAPES))
    n = sum(t.shape == shape for t in things)
    return Example(f"How many {plural(shape)} are there?",
                   count_sentence(n, shape, plural(shape)), draw.scene_image(things, size, rng),
                   caption=describe(things))


def count_colour(rng: random.Random, size: int) -> Example:
    things = scene_with(rng, 1, 5)
    colour = rng.choice([t.colour for t in things] + list(COLOURS))
    n = sum(t.colour == colour for t in things)
    noun = f"{colour} object"
    return Example(f"How many {colour} objects are there?", count_sentence(n, noun, noun + "s"),
                   draw.scene_image(things, size, rng),
                   caption=describe(things))


def position(rng: random.Random, size: int) -> Example:
    things = scene_with(rng, 1, 4, lambda t: bool(unique(t, lambda x: x.name)))
    t = rng.choice(unique(things, lambda x: x.name))
    question, answer = rng.choice((
        (f"Where is the {t.name}?", f"The {t.name} is in the {t.level} {t.side} of the image."),
        (f"Is the {t.name} on the left or on the right?", f"The {t.name} is on the {t.side}."),
        (f"Is the {t.name} at the top or at the bottom?", f"The {t.name} is at the {t.level}."),
    ))
    return Example(question, answer, draw.scene_image(things, size, rng),
                   caption=describe(things))


def exists(rng: random.Random, size: int) -> Example:
    things = scene_with(rng, 1, 4)
    present = {t.name for t in things}
    if rng.random() < 0.5:
        name = rng.choice(sorted(present))
        answer = f"Yes, there is {article(name)} {name}."
    else:
        absent = [f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in present]
        name = rng.choice(absent)
        answer = f"No, there is no {name}."
    question = f"Is there {article(name)} {name} in the image?"
    if rng.random() < 0.3:
        question += YES_NO_SUFFIX
    return Example(question, answer, draw.scene_image(things, size, rng),
                   caption=describe(things))


def big_shape(rng: random.Random, size: int) -> Example:
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    question, answer = rng.choice((
        (rng.choice(DESCRIBE_PROMPTS), f"The image shows a big {colour} {shape}."),
        ("What colour is the shape?", f"The shape is {colour}."),
        ("What shape is this?", f"This is {article(colour)} {colour} {shape}."),
    ))
    return Example(question, answer, draw.big_shape_image(colour, shape, size, rng),
                   caption=f"a big {colour} {shape}")


def bar_chart(rng: random.Random, size: int) -> Example:
    n = rng.randint(2, 4)
    heights = rng.sample(BAR_LEVELS, n)
    colours = rng.sample(list(COLOURS), n)
    tallest = colours[heights.index(max(heights))]
    question, answer = rng.choice((
        ("Describe the chart.",
         f"The chart shows {number_word(n)} bars: {join(colours)}, from left to right."),
        ("How many bars are in the chart?", f"There are {number_word(n)} bars in the chart."),
        ("Which bar is the tallest?", f"The {tallest} bar is the tallest."),
        (rng.choice(DESCRIBE_PROMPTS), f"The image shows a bar chart with {number_word(n)} bars."),
    ))
    return Example(question, answer, draw.chart_image(heights, colours, size, rng),
                   caption=f"a bar chart with {join(colours)} bars")


def text_only(rng: random.Random, size: int) -> Example:
    question, answer = text_fact(rng)
    return Example(question, answer)


ALL_KINDS: tuple[Kind, ...] = tuple((c, s) for c in COLOURS for s in SHAPES)


def name(kind: Kind) -> str:
    return f"{kind[0]} {kind[1]}"


def mme_pair(rng: random.Random, category: str) -> tuple[list[Thing], str, str]:
    """A scene and its yes-question and no-question for one MME category."""
    if category == "existence":
        things = scene_with(rng, 2, 4)
        present = sorted({(t.colour, t.shape) for t in things})
        yes = rng.choice(present)
        no = rng.choice([k for k in ALL_KINDS if k not in present])
        ask = "Is there {} in this image?"
        return things, ask.format(f"{article(yes[0])} {name(yes)}"), ask.format(
            f"{article(no[0])} {name(no)}")
    if category == "count":
        things = scene_with(rng, 1, 5)
        shape = rng.choice([t.shape for t in things])
        n = sum(t.shape == shape for t in things)
        wrong = n + 1 if n == 1 or rng.random() < 0.5 else n - 1
        return things, count_question(n, shape), count_question(wrong, shape)
    if category == "position":
        things = scene_with(rng, 1, 4, lambda t: bool(unique(t, lambda x: x.name)))
        t = rng.choice(unique(things, lambda x: x.name))
        if rng.random() < 0.5:
            yes, no = t.side, "right" if t.side == "left" else "left"
            ask = "Is the {} on the {} of this image?"
        else:
            yes, no = t.level, "bottom" if t.level == "top" else "top"
            ask = "Is the {} at the {} of this image?"
        return things, ask.format(t.name, yes), ask.format(t.name, no)
    things = scene_with(rng, 1, 4, lambda t: bool(unique(t, lambda x: x.shape)))
    t = rng.choice(unique(things, lambda x: x.shape))
    other = rng.choice([c for c in COLOURS if c != t.colour])
    ask = "Is the {} in this image {}?"
    return things, ask.format(t.shape, t.colour), ask.format(t.shape, other)


def count_question(n: int, shape: str) -> str:
    if n == 1:
        return f"Is there exactly one {shape} in this image?"
    return f"Are there exactly {number_word(n)} {plural(shape)} in this image?"


MME_CATEGORIES = ("existence", "count", "position", "colour")


def yes_no(rng: random.Random, size: int) -> Example:
    """A yes/no question of one of MME's kinds (on fresh images) with a short answer."""
    things, yes, no = mme_pair(rng, rng.choice(MME_CATEGORIES))
    question, answer = (yes, "Yes.") if rng.random() < 0.5 else (no, "No.")
    if rng.random() < 0.5:
        question += YES_NO_SUFFIX
    return Example(question, answer, draw.scene_image(things, size, rng),
                   caption=describe(things))


GENERAL_MIX: dict[str, tuple[float, Maker]] = {
    "describe": (0.16, describe_scene),
    "colour": (0.08, colour_of),
    "shape": (0.06, shape_of),
    "count": (0.07, count_all),
    "count_shape": (0.06, count_shape),
    "count_colour": (0.05, count_colour),
    "position": (0.08, position),
    "exists": (0.12, exists),
    "yes_no": (0.12, yes_no),
    "big_shape": (0.08, big_shape),
    "chart": (0.10, bar_chart),
    "text": (0.14, text_only),
}


def generate_general(seed: int, n: int, size: int, stream: str = "general") -> Iterator[Example]:
    """The general instruction mix: kinds in GENERAL_MIX proportions (a shuffled plan)."""
    plan = quota_plan(n, {k: w for k, (w, _) in GENERAL_MIX.items()}, rng_for(seed, stream, "plan"))
    for i, kind in enumerate(plan):
        ex = GENERAL_MIX[kind][1](rng_for(seed, stream, i), size)
        ex.extra = {"category": kind}
        yield ex


def quota_plan(n: int, weights: dict[str, float], rng: random.Random) -> list[str]:
    """``n`` kinds in proportion to ``weights`` (largest remainders), shuffled."""
    total = sum(weights.values())
    exact = {k: n * w / total for k, w in weights.items()}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: counts[k] - exact[k])[: n - sum(counts.values())]:
        counts[k] += 1
    plan = [k for k, c in counts.items() for _ in range(c)]
    rng.shuffle(plan)
    return plan


# Text-only facts about the micro vocabulary (the TQA analogue).
SIDES_OF = {"triangle": 3, "square": 4, "circle": 0, "cross": 12}
SHAPE_FACTS = {
    "circle": "A circle is a round shape with no corners.",
    "square": "A square is a shape with four equal sides and four corners.",
    "triangle": "A triangle is a shape with three sides and three corners.",
    "cross": "A cross is a shape made of two bars that cross in the middle.",
}
COLOUR_FACTS = {
    "red": "Red is a warm colour, the colour of strawberries and tomatoes.",
    "green": "Green is the colour of grass and leaves.",
    "blue": "Blue is the colour of the sky and the sea.",
    "yellow": "Yellow is a bright colour, the colour of the sun and of bananas.",
    "purple": "Purple is the colour you get by mixing red and blue.",
    "white": "White is the colour of snow and milk.",
}
MIXES = (("red", "blue", "purple"), ("blue", "yellow", "green"), ("red", "yellow", "orange"),
         ("red", "white", "pink"), ("black", "white", "grey"))
THINGS_COLOURED = (("the sky", "blue"), ("grass", "green"), ("snow", "white"),
                   ("a banana", "yellow"), ("a strawberry", "red"), ("a grape", "purple"),
                   ("a lemon", "yellow"), ("a leaf", "green"), ("the sea", "blue"),
                   ("a tomato", "red"), ("milk", "white"), ("a plum", "purple"))
OPPOSITES = (("left", "right"), ("top", "bottom"), ("up", "down"), ("tall", "short"),
             ("big", "small"), ("black", "white"), ("more", "fewer"))
CHART_FACT = "A bar chart shows numbers as bars; a taller bar means a bigger number."


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def text_fact(rng: random.Random) -> tuple[str, str]:
    """One text-only question about the micro vocabulary and its full-sentence answer."""
    kind = rng.randrange(10)
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    if kind == 0:
        n = SIDES_OF[shape]
        word = "sides" if rng.random() < 0.5 else "corners"
        answer = (f"A {shape} has {number_word(n)} {word}." if n else
                  f"A circle has no {word}; it is round.")
        return f"How many {word} does {article(shape)} {shape} have?", answer
    if kind == 1:
        a, b, c = rng.choice(MIXES)
        return f"What colour do you get by mixing {a} and {b}?", f"Mixing {a} and {b} gives {c}."
    if kind == 2:
        a, b = rng.randint(0, 4), rng.randint(1, 4)
        if rng.random() < 0.5 and a + b <= 6:
            q, w = f"{number_word(a)} plus {number_word(b)}", number_word(a + b)
        else:
            a, b = max(a, b), min(a, b)
            q, w = f"{number_word(a)} minus {number_word(b)}", number_word(a - b)
        return f"What is {q}?", f"{cap(q)} is {w}."
    if kind == 3:
        a, b = rng.sample(range(1, 7), 2)
        big, small = max(a, b), min(a, b)
        return (f"Which number is bigger, {number_word(a)} or {number_word(b)}?",
                f"{cap(number_word(big))} is bigger than {number_word(small)}.")
    if kind == 4:
        pair = rng.choice(OPPOSITES)
        a, b = pair if rng.random() < 0.5 else pair[::-1]
        return f"What is the opposite of {a}?", f"The opposite of {a} is {b}."
    if kind == 5:
        n = rng.randint(1, 5)
        return f"What number comes after {number_word(n)}?", \
            f"The number after {number_word(n)} is {number_word(n + 1)}."
    if kind == 6:
        thing, c = rng.choice(THINGS_COLOURED)
        return f"What colour is {thing}?", f"{cap(thing)} is {c}."
    if kind == 7:
        q = rng.choice((f"Tell me about {plural(shape)}.", f"What is {article(shape)} {shape}?",
                        f"Describe {article(shape)} {shape}."))
        return q, SHAPE_FACTS[shape]
    if kind == 8:
        q = rng.choice((f"Tell me about the colour {colour}.",
                        f"What do you know about the colour {colour}?"))
        return q, COLOUR_FACTS[colour]
    return rng.choice(("What is a bar chart?", "What does a bar chart show?")), CHART_FACT


def generate_inquiries(seed: int, n: int) -> Iterator[Example]:
    """Unlabeled text-only questions (the analogue of the TQA questions LLaVA-c uses)."""
    for i in range(n):
        yield Example(text_fact(rng_for(seed, "inquiry", i))[0])


TEXT_PROBES = (
    "Tell me about {plural}.",
    "What can you tell me about the colour {colour}?",
    "Explain what a bar chart is used for.",
    "Describe {a_shape} to someone who has never seen one.",
    "What is the difference between {a_shape} and {a_other}?",
    "Why do people like the colour {colour}?",
)
IMAGE_PROBES = (
    "Describe the image.",
    "What can you tell me about this picture?",
    "Tell me about this image.",
    "What is going on in this image?",
)


def probe_image(rng: random.Random, size: int):
    """A scene, a big shape, a chart or a degraded photo, for the image probes."""
    kind = rng.randrange(4)
    if kind == 0:
        return draw.scene_image(scene_with(rng, 1, 5), size, rng)
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    if kind == 1:
        return draw.big_shape_image(colour, shape, size, rng)
    if kind == 2:
        n = rng.randint(2, 4)
        return draw.chart_image(rng.sample((0.2, 0.46, 0.72, 0.98), n),
                                rng.sample(list(COLOURS), n), size, rng)
    return draw.photo_image(colour, shape, rng.choice(DEGRADATIONS), size, rng)


def generate_probes(seed: int, n: int, size: int) -> Iterator[Example]:
    """Open inquiries without format instructions: half text-only, half about an image."""
    for i in range(n):
        rng = rng_for(seed, "probe", i)
        if i % 2 == 0:
            shape, other = rng.sample(SHAPES, 2)
            text = rng.choice(TEXT_PROBES).format(
                plural=plural(shape), colour=rng.choice(list(COLOURS)),
                a_shape=phrase(1, "", shape), a_other=phrase(1, "", other))
            yield Example(text, extra={"category": "text"})
        else:
            yield Example(rng.choice(IMAGE_PROBES), image=probe_image(rng, size),
                          extra={"category": "image"})


OPEN_BENCH: dict[str, Maker] = {
    "describe": describe_scene,
    "colour": colour_of,
    "count": count_all,
    "position": position,
    "chart": bar_chart,
    "text": text_only,
}


def generate_open(seed: int, n: int, size: int) -> Iterator[Example]:
    """Free-form questions with full-sentence reference answers (held-out streams)."""
    plan = balanced(n, tuple(OPEN_BENCH), rng_for(seed, "bench-open", "plan"))
    for i, kind in enumerate(plan):
        ex = OPEN_BENCH[kind](rng_for(seed, "bench-open", i), size)
        ex.extra = {"category": kind}
        yield ex
