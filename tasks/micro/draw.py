"""PIL drawing of the micro world: shapes, composite objects, renditions, charts, photos, scenes.

Everything is drawn at ``SUPERSAMPLE`` times the output size, then area-averaged down, so that
small shapes keep their silhouettes. Coordinates are fractions of the image side.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from tasks.micro.scene import Thing
from tasks.micro.world import COLOURS, GRID, Colour

SUPERSAMPLE = 4
BLACK: Colour = (0, 0, 0)
AXIS: Colour = (140, 140, 140)

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of the image side
# A part of a silhouette in unit coordinates of its box: (kind, points), kind one of
# "rect", "ellipse", "poly" (added) or "erase" (an ellipse removed).
Part = tuple[str, tuple[tuple[float, float], ...]]

SHAPE_PARTS: dict[str, tuple[Part, ...]] = {
    "circle": (("ellipse", ((0, 0), (1, 1))),),
    "square": (("rect", ((0, 0), (1, 1))),),
    "triangle": (("poly", ((0.5, 0), (1, 1), (0, 1))),),
    "cross": (("rect", ((0, 0.33), (1, 0.67))), ("rect", ((0.33, 0), (0.67, 1)))),
}
OBJECT_PARTS: dict[str, tuple[Part, ...]] = {
    "house": (("poly", ((0, 0.47), (0.5, 0.02), (1, 0.47))), ("rect", ((0.14, 0.45), (0.86, 1)))),
    "tree": (("poly", ((0.5, 0), (0.95, 0.72), (0.05, 0.72))), ("rect", ((0.4, 0.7), (0.6, 1)))),
    "car": (
        ("rect", ((0, 0.4), (1, 0.74))),
        ("rect", ((0.2, 0.12), (0.72, 0.42))),
        ("ellipse", ((0.08, 0.6), (0.38, 0.9))),
        ("ellipse", ((0.62, 0.6), (0.92, 0.9))),
    ),
    "boat": (
        ("poly", ((0, 0.62), (1, 0.62), (0.8, 0.92), (0.2, 0.92))),
        ("rect", ((0.46, 0.04), (0.53, 0.62))),
        ("poly", ((0.53, 0.08), (0.53, 0.56), (0.92, 0.56))),
        ("poly", ((0.46, 0.22), (0.46, 0.56), (0.16, 0.56))),
    ),
    "fish": (("ellipse", ((0, 0.2), (0.72, 0.8))), ("poly", ((0.6, 0.5), (1, 0.14), (1, 0.86)))),
    "flower": (
        ("ellipse", ((0.34, 0.0), (0.66, 0.32))),
        ("ellipse", ((0.12, 0.2), (0.44, 0.52))),
        ("ellipse", ((0.56, 0.2), (0.88, 0.52))),
        ("ellipse", ((0.34, 0.34), (0.66, 0.62))),
        ("ellipse", ((0.32, 0.16), (0.68, 0.5))),
        ("rect", ((0.46, 0.55), (0.54, 1))),
        ("ellipse", ((0.54, 0.7), (0.86, 0.84))),
    ),
    "arrow": (("rect", ((0, 0.37), (0.58, 0.63))), ("poly", ((0.5, 0.06), (1, 0.5), (0.5, 0.94)))),
    "moon": (("ellipse", ((0, 0), (1, 1))), ("erase", ((0.32, -0.08), (1.2, 0.8)))),
}


def hires(size: int) -> int:
    return size * SUPERSAMPLE


def canvas(size: int, background: Colour = BLACK) -> Image.Image:
    """An empty high-resolution RGB canvas for an output image of ``size`` pixels."""
    return Image.new("RGB", (hires(size), hires(size)), background)


def silhouette(parts: Sequence[Part], box: Box, size: int, mirror: bool = False) -> Image.Image:
    """The high-resolution L mask (255 inside) of ``parts`` drawn in ``box``."""
    full = hires(size)
    mask = Image.new("L", (full, full), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = (v * full for v in box)
    w, h = x1 - x0, y1 - y0

    def at(u: float, v: float) -> tuple[float, float]:
        return (x0 + (1 - u if mirror else u) * w, y0 + v * h)

    for kind, points in parts:
        xy = [at(u, v) for u, v in points]
        if kind in ("rect", "ellipse", "erase"):
            (ax, ay), (bx, by) = xy
            corners = (min(ax, bx), min(ay, by), max(ax, bx) - 1, max(ay, by) - 1)
            if kind == "rect":
                draw.rectangle(corners, fill=255)
            else:
                draw.ellipse(corners, fill=0 if kind == "erase" else 255)
        else:
            draw.polygon(xy, fill=255)
    return mask


def styled(mask: Image.Image, style: str, size: int, rng: random.Random) -> Image.Image:
    """The mask of a rendition style: filled (and noisy), outline or striped."""
    if style == "outline":
        width = 2 * max(1, round(1.5 * SUPERSAMPLE * size / 32)) + 1
        return ImageChops.subtract(mask, mask.filter(ImageFilter.MinFilter(width)))
    if style == "striped":
        period = max(2, round(SUPERSAMPLE * 4 * size / 32))
        full = mask.size[0]
        y, x = np.mgrid[0:full, 0:full]
        direction = rng.choice((x + y, x - y + full, y))
        stripes = ((direction + rng.randrange(period)) // (period // 2 or 1)) % 2 == 0
        return ImageChops.multiply(mask, Image.fromarray((stripes * 255).astype(np.uint8), "L"))
    return mask


def jitter(colour: Colour, rng: random.Random, amount: int = 12) -> Colour:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in colour)  # type: ignore[return-value]


def paint(img: Image.Image, mask: Image.Image, colour: Colour) -> None:
    """Fill ``mask`` with ``colour`` on ``img`` in place."""
    img.paste(Image.new("RGB", img.size, colour), (0, 0), mask)


def finish(img: Image.Image, size: int) -> Image.Image:
    """Area-average the high-resolution canvas down to ``size`` pixels."""
    return img.resize((size, size), Image.Resampling.BOX)


def add_noise(img: Image.Image, rng: random.Random, sigma: float) -> Image.Image:
    """Gaussian pixel noise (a numpy Generator seeded from ``rng``)."""
    gen = np.random.default_rng(rng.getrandbits(64))
    arr = np.asarray(img, dtype=np.float32) + gen.normal(0, sigma, (*img.size[::-1], 3))
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "RGB")


def shape_box(rng: random.Random, low: float, high: float) -> Box:
    """A square box of side in [low, high] placed at random inside the image."""
    side = rng.uniform(low, high)
    x, y = rng.uniform(0, 1 - side), rng.uniform(0, 1 - side)
    return (x, y, x + side, y + side)


def cell_box(row: int, col: int, rng: random.Random) -> Box:
    """A square box inside a grid cell, of 62-82 % of its side, jittered within the cell."""
    cell = 1 / GRID
    side = rng.uniform(0.62, 0.82) * cell
    x = col * cell + rng.uniform(0.1, 0.9) * (cell - side)
    y = row * cell + rng.uniform(0.1, 0.9) * (cell - side)
    return (x, y, x + side, y + side)


def scene_image(things: Sequence[Thing], size: int, rng: random.Random) -> Image.Image:
    """Shapes in their grid cells on black."""
    img = canvas(size)
    for t in things:
        mask = silhouette(SHAPE_PARTS[t.shape], cell_box(t.row, t.col, rng), size)
        paint(img, mask, jitter(COLOURS[t.colour], rng))
    return finish(img, size)


def big_shape_image(colour: str, shape: str, size: int, rng: random.Random) -> Image.Image:
    """One large filled shape on black."""
    img = canvas(size)
    paint(img, silhouette(SHAPE_PARTS[shape], shape_box(rng, 0.45, 0.75), size),
          jitter(COLOURS[colour], rng))
    return finish(img, size)


def object_image(name: str, colour: str, style: str, size: int, rng: random.Random) -> Image.Image:
    """An object class (house, tree, ...) in a rendition style, possibly mirrored."""
    img = canvas(size)
    mask = silhouette(OBJECT_PARTS[name], shape_box(rng, 0.62, 0.84), size, rng.random() < 0.5)
    paint(img, styled(mask, style, size, rng), jitter(COLOURS[colour], rng))
    img = finish(img, size)
    return add_noise(img, rng, 55) if style == "noisy" else img


def chart_image(heights: Sequence[float], colours: Sequence[str], size: int,
                rng: random.Random) -> Image.Image:
    """A bar chart: axes and one bar per height (fractions of the plot height)."""
    img = canvas(size)
    full = hires(size)
    draw = ImageDraw.Draw(img)
    left, bottom, top = 0.1 * full, 0.9 * full, 0.08 * full
    line = max(1, round(SUPERSAMPLE * size / 32))
    draw.rectangle((left - line, top, left - 1, bottom + line - 1), fill=AXIS)
    draw.rectangle((left - line, bottom, 0.96 * full, bottom + line - 1), fill=AXIS)
    slot = (0.96 * full - left) / len(heights)
    for i, (h, c) in enumerate(zip(heights, colours, strict=True)):
        x0 = left + (i + 0.2) * slot
        x1 = left + (i + 0.8) * slot
        draw.rectangle((x0, bottom - h * (bottom - top), x1 - 1, bottom - 1),
                       fill=jitter(COLOURS[c], rng))
    return finish(img, size)


def photo_image(colour: str, shape: str, degradation: str, size: int,
                rng: random.Random) -> Image.Image:
    """A 'photo' of one shape standing on a floor, degraded: blurry, tilted or dark."""
    wall = tuple(rng.randint(18, 40) for _ in range(3))
    floor = tuple(rng.randint(75, 105) for _ in range(3))
    img = canvas(size, wall)  # type: ignore[arg-type]
    full = hires(size)
    horizon = rng.uniform(0.62, 0.74)
    ImageDraw.Draw(img).rectangle((0, horizon * full, full, full), fill=floor)
    side = rng.uniform(0.42, 0.56)
    x = rng.uniform(0.5 - side / 2 - 0.1, 0.5 - side / 2 + 0.1)
    y = horizon + 0.06 - side
    paint(img, silhouette(SHAPE_PARTS[shape], (x, y, x + side, y + side), size),
          jitter(COLOURS[colour], rng))
    if degradation == "blurry":
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(1.4, 1.9) * SUPERSAMPLE * size / 32))
    elif degradation == "tilted":
        angle = rng.choice((-1, 1)) * rng.uniform(25, 40)
        img = img.rotate(angle, Image.Resampling.BICUBIC, fillcolor=BLACK)
    elif degradation == "dark":
        factor = rng.uniform(0.28, 0.38)
        img = img.point(lambda v: round(v * factor))
    return finish(img, size)
