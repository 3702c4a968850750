"""The micro world's configuration, its cache key and its vocabulary tables."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass

FORMAT_VERSION = 5

Colour = tuple[int, int, int]

# Six very distinct colours on a black background.
COLOURS: dict[str, Colour] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 100, 255),
    "yellow": (240, 220, 40),
    "purple": (170, 60, 230),
    "white": (235, 235, 235),
}
# Basic shapes: the vocabulary of scenes, photos and icons (what the general mix teaches).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "cross": "crosses",
    "fish": "fish",
}
# Object classes of the ImageNet-R analogue: composite silhouettes the general mix never names.
OBJECTS: tuple[str, ...] = ("house", "tree", "car", "boat", "fish", "flower", "arrow", "moon")
STYLES: tuple[str, ...] = ("filled", "outline", "striped", "noisy")
DEGRADATIONS: tuple[str, ...] = ("blurry", "tilted", "dark")
NUMBERS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve",
)
SIDES: tuple[str, ...] = ("left", "right")
LEVELS: tuple[str, ...] = ("top", "bottom")
GRID = 4  # scenes place objects in the cells of a GRID x GRID layout (one cell per 8 px patch)
LETTERS = "ABCD"
BAR_LEVELS: tuple[float, ...] = (0.2, 0.33, 0.46, 0.59, 0.72, 0.85, 0.98)  # of plot height


@dataclass(frozen=True)
class MicroWorldConfig:
    """Sizes and seed of a generated micro world; equal configs give byte-identical files."""

    seed: int = 0
    image_size: int = 32
    n_train: int = 1500  # per task
    n_test: int = 150  # per task
    n_general: int = 6000  # general instruction mix (base model training)
    n_inquiry: int = 500  # unlabeled text-only inquiries
    n_probe: int = 100  # open degradation probes (half with an image)
    n_bench: int = 120  # questions per general benchmark file
    n_clip: int = 12000  # image-caption pairs for the tiny CLIP
    n_align: int = 4000  # brief-caption conversations for the projector's alignment
    n_text: int = 6000  # text-only conversations for the tiny language model

    def fingerprint(self) -> str:
        """A short stable hash of the config and the format version (the cache key)."""
        text = json.dumps([FORMAT_VERSION, asdict(self)], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def rng_for(seed: int, *parts: object) -> random.Random:
    """An independent random stream named by ``parts`` (no global RNG state)."""
    return random.Random(":".join([str(seed), *map(str, parts)]))


def balanced(n: int, values: tuple | list, rng: random.Random) -> list:
    """``n`` values cycling through ``values`` (each equally often, up to one), shuffled."""
    out = [values[i % len(values)] for i in range(n)]
    rng.shuffle(out)
    return out


def bar_colour(kind: str, heights: list[float], colours: list[str]) -> str:
    """The colour of a chart's ``tallest``, ``shortest``, ``leftmost`` or ``rightmost`` bar."""
    return {
        "tallest": colours[heights.index(max(heights))],
        "shortest": colours[heights.index(min(heights))],
        "leftmost": colours[0],
        "rightmost": colours[-1],
    }[kind]


def number_word(n: int) -> str:
    return NUMBERS[n]
