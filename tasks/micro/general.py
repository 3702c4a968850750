"""The general instruction mix (the LLaVA-665k analogue), text-only inquiries and open probes.

Answers are full sentences, except under LLaVA-1.5's short-answer instruction (one word) and in
yes/no questions. The mix teaches the vocabulary the tasks use (colours, shapes, counts,
positions, chart words) and, as LLaVA-1.5's mix does, the single-word answer format of ImageNet-R
and CLEVR-Math; never a task's images, option letters or captions.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from tasks.llava665k import WORD as WORD_INSTRUCTION  # LLaVA-1.5's VQAv2 and GQA records
from tasks.micro import draw
from tasks.micro.facts import text_fact
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
    bar_colour,
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
    "What is happening in this image?",
    "What is going on here?",
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


def with_unique(rng: random.Random, key: Callable[[Thing], str]) -> tuple[list[Thing], Thing]:
    """A scene of 1-4 things and one of them that no other shares ``key`` with."""
    things = scene_with(rng, 1, 4, lambda t: bool(unique(t, key)))
    return things, rng.choice(unique(things, key))


def colour_of(rng: random.Random, size: int) -> Example:
    things, t = with_unique(rng, lambda x: x.shape)
    return Example(f"What colour is the {t.shape}?", f"The {t.shape} is {t.colour}.",
                   draw.scene_image(things, size, rng),
                   caption=describe(things))


def shape_of(rng: random.Random, size: int) -> Example:
    things, t = with_unique(rng, lambda x: x.colour)
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


def shape_count(rng: random.Random) -> tuple[list[Thing], str, int]:
    """A scene of 1-5 things, a shape (present or not) and how many things have it."""
    things = scene_with(rng, 1, 5)
    shape = rng.choice([t.shape for t in things] + list(SHAPES))
    return things, shape, sum(t.shape == shape for t in things)


def count_shape(rng: random.Random, size: int) -> Example:
    things, shape, n = shape_count(rng)
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


def random_chart(rng: random.Random) -> tuple[list[float], list[str]]:
    """Heights and colours of 2-4 bars (distinct levels, distinct colours)."""
    n = rng.randint(2, 4)
    return rng.sample(BAR_LEVELS, n), rng.sample(list(COLOURS), n)


def bar_chart(rng: random.Random, size: int) -> Example:
    heights, colours = random_chart(rng)
    n = len(heights)
    tallest, shortest = (bar_colour(k, heights, colours) for k in ("tallest", "shortest"))
    question, answer = rng.choice((
        ("Describe the chart.",
         f"The chart shows {number_word(n)} bars: {join(colours)}, from left to right."),
        ("How many bars are in the chart?", f"There are {number_word(n)} bars in the chart."),
        ("Which bar is the tallest?", f"The {tallest} bar is the tallest."),
        ("Which bar is the shortest?", f"The {shortest} bar is the shortest."),
        (f"What colour is the {rng.choice(('leftmost', 'first'))} bar?",
         f"The leftmost bar is {colours[0]}."),
        (f"What colour is the {rng.choice(('rightmost', 'last'))} bar?",
         f"The rightmost bar is {colours[-1]}."),
        (rng.choice(DESCRIBE_PROMPTS), f"The image shows a bar chart with {number_word(n)} bars."),
    ))
    return Example(question, answer, draw.chart_image(heights, colours, size, rng),
                   caption=f"a bar chart with {join(colours)} bars")


SHORT_CHART_QUESTIONS = {
    "tallest": "Which bar is the tallest?",
    "shortest": "Which bar is the shortest?",
    "leftmost": "What colour is the leftmost bar?",
    "rightmost": "What colour is the rightmost bar?",
}


def short_answer(rng: random.Random, size: int) -> Example:
    """A question answered with one word under LLaVA-1.5's short-answer instruction (the analogue
    of its VQAv2 and GQA records): a colour, a shape, a count or a bar's colour."""
    kind = rng.randrange(4)
    if kind == 0:
        things, t = with_unique(rng, lambda x: x.shape)
        question, word = f"What colour is the {t.shape}?", t.colour
    elif kind == 1:
        things, t = with_unique(rng, lambda x: x.colour)
        question, word = f"What shape is the {t.colour} object?", t.shape
    elif kind == 2:
        things, shape, n = shape_count(rng)
        question, word = f"How many {plural(shape)} are there?", number_word(n)
    else:
        heights, colours = random_chart(rng)
        kind = rng.choice(tuple(SHORT_CHART_QUESTIONS))
        return Example(f"{SHORT_CHART_QUESTIONS[kind]}\n{WORD_INSTRUCTION}",
                       bar_colour(kind, heights, colours),
                       draw.chart_image(heights, colours, size, rng),
                       caption=f"a bar chart with {join(colours)} bars")
    return Example(f"{question}\n{WORD_INSTRUCTION}", word, draw.scene_image(things, size, rng),
                   caption=describe(things))


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
    "describe": (0.13, describe_scene),
    "colour": (0.06, colour_of),
    "shape": (0.05, shape_of),
    "count": (0.06, count_all),
    "count_shape": (0.05, count_shape),
    "count_colour": (0.05, count_colour),
    "position": (0.06, position),
    "exists": (0.09, exists),
    "yes_no": (0.09, yes_no),
    "big_shape": (0.06, big_shape),
    "chart": (0.08, bar_chart),
    "short": (0.10, short_answer),
    "text": (0.12, text_only),
}


def generate_general(seed: int, n: int, size: int, stream: str = "general",
                     kinds: tuple[str, ...] = tuple(GENERAL_MIX)) -> Iterator[Example]:
    """The general instruction mix (or its ``kinds`` only): kinds in GENERAL_MIX proportions
    (a shuffled plan)."""
    plan = quota_plan(n, {k: GENERAL_MIX[k][0] for k in kinds}, rng_for(seed, stream, "plan"))
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
