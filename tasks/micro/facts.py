"""Text-only knowledge of the micro world: questions with full-sentence answers.

This is what the tiny language model knows before it sees an image (as Vicuna knows words before
LLaVA's training), and the text-only part of the general mix (the TQA analogue). It names every
word the tasks answer with (object classes, photo qualities, spatial relations, option letters),
so that a task teaches the link from an image to a known word, never the word itself; it never
uses a task's instruction or answer format.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from tasks.micro.scene import article, plural
from tasks.micro.world import COLOURS, LETTERS, OBJECTS, SHAPES, number_word

Fact = tuple[str, str]  # question, answer

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
OBJECT_FACTS = {
    "house": "A house is a building with walls, a roof and a door, where people live.",
    "tree": "A tree is a tall plant with a trunk, branches and leaves.",
    "car": "A car is a vehicle with four wheels that drives on roads.",
    "boat": "A boat is a vehicle that floats on water, often with a mast and a sail.",
    "fish": "A fish is an animal that lives in water and swims with its fins and tail.",
    "flower": "A flower is the colourful part of a plant, with petals on a stem.",
    "arrow": "An arrow is a sign with a pointed head that shows a direction.",
    "moon": "The moon shines in the night sky; it often looks like a thin crescent.",
}
OBJECT_PLACES = {
    "house": "in a street", "tree": "in a forest", "car": "on a road", "boat": "on the sea",
    "fish": "in a river", "flower": "in a garden", "arrow": "on a sign", "moon": "in the sky",
}
STYLE_FACTS = {
    "filled": "A filled drawing is coloured in completely.",
    "outline": "An outline drawing shows only the edges of a shape, not its inside.",
    "striped": "A striped drawing is coloured with parallel stripes.",
    "noisy": "A noisy picture is covered in random speckles.",
}
PHOTO_FACTS = {
    "blurry": "A blurry photo is out of focus, so its edges look soft and blurred.",
    "tilted": "A tilted photo is taken at an angle, so it looks crooked.",
    "dark": "A dark photo is taken in low light, so everything in it looks dim.",
}
RELATIONS = (("left of", "right of"), ("above", "below"))
MIXES = (("red", "blue", "purple"), ("blue", "yellow", "green"), ("red", "yellow", "orange"),
         ("red", "white", "pink"), ("black", "white", "grey"))
THINGS_COLOURED = (("the sky", "blue"), ("grass", "green"), ("snow", "white"),
                   ("a banana", "yellow"), ("a strawberry", "red"), ("a grape", "purple"),
                   ("a lemon", "yellow"), ("a leaf", "green"), ("the sea", "blue"),
                   ("a tomato", "red"), ("milk", "white"), ("a plum", "purple"))
OPPOSITES = (("left", "right"), ("top", "bottom"), ("up", "down"), ("tall", "short"),
             ("big", "small"), ("black", "white"), ("more", "fewer"), ("above", "below"),
             ("tallest", "shortest"), ("leftmost", "rightmost"), ("bright", "dark"))
CHART_FACT = "A bar chart shows numbers as bars; a taller bar means a bigger number."
ORDINALS = ("first", "second", "third", "fourth")


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def sides(rng: random.Random) -> Fact:
    shape = rng.choice(SHAPES)
    n = SIDES_OF[shape]
    word = "sides" if rng.random() < 0.5 else "corners"
    if n:
        return f"How many {word} does {article(shape)} {shape} have?", \
            f"A {shape} has {number_word(n)} {word}."
    answer = f"A circle has no {word}; it is round."
    return f"How many {word} does {article(shape)} {shape} have?", answer


def shape_difference(rng: random.Random) -> Fact:
    a, b = rng.sample(SHAPES, 2)
    question = rng.choice((f"How is {article(a)} {a} different from {article(b)} {b}?",
                           f"What is the difference between {plural(a)} and {plural(b)}?"))
    return question, f"{cap(article(a))} {a} has {edges(a)}, while {article(b)} {b} has {edges(b)}."


def edges(shape: str) -> str:
    n = SIDES_OF[shape]
    return f"{number_word(n)} sides" if n else "no corners and is round"


def mixing(rng: random.Random) -> Fact:
    a, b, c = rng.choice(MIXES)
    return f"What colour do you get by mixing {a} and {b}?", f"Mixing {a} and {b} gives {c}."


def arithmetic(rng: random.Random) -> Fact:
    a, b = rng.randint(0, 4), rng.randint(1, 4)
    if rng.random() < 0.5 and a + b <= 6:
        q, w = f"{number_word(a)} plus {number_word(b)}", number_word(a + b)
    else:
        a, b = max(a, b), min(a, b)
        q, w = f"{number_word(a)} minus {number_word(b)}", number_word(a - b)
    return f"What is {q}?", f"{cap(q)} is {w}."


def bigger(rng: random.Random) -> Fact:
    a, b = rng.sample(range(1, 7), 2)
    return (f"Which number is bigger, {number_word(a)} or {number_word(b)}?",
            f"{cap(number_word(max(a, b)))} is bigger than {number_word(min(a, b))}.")


def opposite(rng: random.Random) -> Fact:
    pair = rng.choice(OPPOSITES)
    a, b = pair if rng.random() < 0.5 else pair[::-1]
    return f"What is the opposite of {a}?", f"The opposite of {a} is {b}."


def successor(rng: random.Random) -> Fact:
    n = rng.randint(1, 5)
    return (f"What number comes after {number_word(n)}?",
            f"The number after {number_word(n)} is {number_word(n + 1)}.")


def thing_colour(rng: random.Random) -> Fact:
    thing, c = rng.choice(THINGS_COLOURED)
    return f"What colour is {thing}?", f"{cap(thing)} is {c}."


def shape_fact(rng: random.Random) -> Fact:
    shape = rng.choice(SHAPES)
    q = rng.choice((f"Tell me about {plural(shape)}.", f"What is {article(shape)} {shape}?",
                    f"Describe {article(shape)} {shape}."))
    return q, SHAPE_FACTS[shape]


def colour_fact(rng: random.Random) -> Fact:
    colour = rng.choice(list(COLOURS))
    q = rng.choice((f"Tell me about the colour {colour}.",
                    f"What do you know about the colour {colour}?"))
    return q, COLOUR_FACTS[colour]


def chart_fact(rng: random.Random) -> Fact:
    return rng.choice(("What is a bar chart?", "What does a bar chart show?")), CHART_FACT


def object_fact(rng: random.Random) -> Fact:
    name = rng.choice(OBJECTS)
    if rng.random() < 0.3:
        return (f"Where would you see {article(name)} {name}?",
                f"You would see {article(name)} {name} {OBJECT_PLACES[name]}.")
    q = rng.choice((f"What is {article(name)} {name}?", f"Tell me about {plural(name)}.",
                    f"Describe {article(name)} {name}."))
    return q, OBJECT_FACTS[name]


def style_fact(rng: random.Random) -> Fact:
    style = rng.choice(list(STYLE_FACTS))
    noun = "picture" if style == "noisy" else "drawing"
    return f"What is {article(style)} {style} {noun}?", STYLE_FACTS[style]


def photo_fact(rng: random.Random) -> Fact:
    quality = rng.choice(list(PHOTO_FACTS))
    return f"What is {article(quality)} {quality} photo?", PHOTO_FACTS[quality]


def relation_fact(rng: random.Random) -> Fact:
    a, b = rng.sample(SHAPES, 2)
    relation, inverse = rng.choice(RELATIONS)
    if rng.random() < 0.5:
        relation, inverse = inverse, relation
    return (f"If the {a} is {relation} the {b}, where is the {b}?",
            f"The {b} is {inverse} the {a}.")


def letter_fact(rng: random.Random) -> Fact:
    i = rng.randrange(len(LETTERS) - 1)
    if rng.random() < 0.5:
        return (f"What letter comes after {LETTERS[i]}?",
                f"The letter after {LETTERS[i]} is {LETTERS[i + 1]}.")
    return (f"What is the {ORDINALS[i]} letter of the alphabet?",
            f"The {ORDINALS[i]} letter of the alphabet is {LETTERS[i]}.")


FACTS: tuple[Callable[[random.Random], Fact], ...] = (
    sides, shape_difference, mixing, arithmetic, bigger, opposite, successor, thing_colour,
    shape_fact, colour_fact, chart_fact, object_fact, style_fact, photo_fact, relation_fact,
    letter_fact,
)


def text_fact(rng: random.Random) -> Fact:
    """One text-only question about the micro vocabulary and its full-sentence answer."""
    return rng.choice(FACTS)(rng)
