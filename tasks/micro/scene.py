"""Scenes of coloured shapes on a grid, and the English used to talk about them."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tasks.micro.world import COLOURS, GRID, PLURALS, SHAPES, number_word


@dataclass(frozen=True)
class Thing:
    """One shape of one colour in one grid cell."""

    colour: str
    shape: str
    row: int
    col: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def side(self) -> str:
        return "left" if self.col < GRID // 2 else "right"

    @property
    def level(self) -> str:
        return "top" if self.row < GRID // 2 else "bottom"


Kind = tuple[str, str]  # (colour, shape)


def cells(rng: random.Random, n: int) -> list[tuple[int, int]]:
    """``n`` distinct grid cells, in reading order."""
    return sorted(rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n))


def place(kinds: Sequence[Kind], rng: random.Random) -> list[Thing]:
    """Things of the given kinds in random distinct cells (kinds shuffled over the cells)."""
    kinds = list(kinds)
    rng.shuffle(kinds)
    return [Thing(c, s, r, k) for (c, s), (r, k) in zip(kinds, cells(rng, len(kinds)), strict=True)]


def random_kind(rng: random.Random, colours: Sequence[str] = tuple(COLOURS),
                shapes: Sequence[str] = SHAPES) -> Kind:
    return rng.choice(list(colours)), rng.choice(list(shapes))


def random_scene(rng: random.Random, n: int) -> list[Thing]:
    """``n`` things of random colours and shapes."""
    return place([random_kind(rng) for _ in range(n)], rng)


def groups(things: Sequence[Thing]) -> list[tuple[str, str, int]]:
    """(colour, shape, count) per kind, in order of first appearance (reading order)."""
    counts: dict[Kind, int] = {}
    for t in sorted(things, key=lambda t: (t.row, t.col)):
        counts[(t.colour, t.shape)] = counts.get((t.colour, t.shape), 0) + 1
    return [(c, s, n) for (c, s), n in counts.items()]


def plural(shape: str) -> str:
    return PLURALS.get(shape, shape + "s")


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def phrase(count: int, colour: str, shape: str) -> str:
    """'a red circle', 'two red circles'."""
    if count == 1:
        words = f"{colour} {shape}" if colour else shape
        return f"{article(words)} {words}"
    return " ".join(w for w in (number_word(count), colour, plural(shape)) if w)


def join(items: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def describe(things: Sequence[Thing]) -> str:
    """'two red circles and a blue square'."""
    return join([phrase(n, c, s) for c, s, n in groups(things)])


def unique(things: Sequence[Thing], key: Callable[[Thing], object]) -> list[Thing]:
    """The things whose ``key`` no other thing shares."""
    values = [key(t) for t in things]
    return [t for t, v in zip(things, values, strict=True) if values.count(v) == 1]


def count_sentence(n: int, noun_singular: str, noun_plural: str,
                   where: str = "in the image") -> str:
    """'There is one circle in the image.' / 'There are no circles in the image.'"""
    if n == 0:
        return f"There are no {noun_plural} {where}."
    if n == 1:
        return f"There is one {noun_singular} {where}."
    return f"There are {number_word(n)} {noun_plural} {where}."
