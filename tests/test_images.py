"""Images as the model sees them: every PIL mode and bit depth to RGB, and decoding up front."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tasks.images
from cl_bench.errors import CLBenchError
from cl_bench.models.llava import load_image
from tasks.images import open_rgb, to_rgb, verify_images

WHITE, BLACK, RED = (255, 255, 255), (0, 0, 0), (255, 0, 0)


def palette_with_transparency() -> Image.Image:
    """A P image: index 0 black and fully transparent (the background), index 1 red."""
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    img.putpixel((1, 1), 1)
    img.info["transparency"] = 0
    return img


def rgb_keyed() -> Image.Image:
    """An RGB PNG whose black is transparent (a tRNS colour key)."""
    img = Image.new("RGB", (2, 1), BLACK)
    img.putpixel((1, 0), RED)
    img.info["transparency"] = BLACK
    return img


def grey16() -> Image.Image:
    """A 16-bit grey image (I;16): 0, 257 * 128 = 32896 and 65535."""
    return Image.fromarray(np.array([[0, 32896, 65535, 65535]], dtype=np.uint16))


# (name, image, suffix it is saved as, pixel -> expected RGB after to_rgb)
CASES = [
    ("P with transparency", palette_with_transparency, ".png", {(0, 0): WHITE, (1, 1): RED}),
    ("LA", lambda: Image.merge("LA", (Image.new("L", (2, 1), 100), Image.frombytes(
        "L", (2, 1), bytes([0, 255])))), ".png", {(0, 0): WHITE, (1, 0): (100, 100, 100)}),
    ("RGBA half transparent", lambda: Image.new("RGBA", (2, 2), (255, 0, 0, 128)), ".png",
     {(0, 0): (255, 127, 127)}),
    ("I;16", grey16, ".png", {(0, 0): BLACK, (1, 0): (128, 128, 128), (2, 0): WHITE}),
    ("I 32-bit, 16-bit range", lambda: Image.fromarray(
        np.array([[0, 32896, 65535]], dtype=np.int32), "I"), ".tif",
     {(1, 0): (128, 128, 128), (2, 0): WHITE}),
    ("I 32-bit, 8-bit range", lambda: Image.fromarray(
        np.array([[0, 100, 255]], dtype=np.int32), "I"), ".tif", {(1, 0): (100, 100, 100)}),
    ("F in 0..1", lambda: Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F"),
     ".tif", {(1, 0): (128, 128, 128), (2, 0): WHITE}),
    ("CMYK", lambda: Image.new("CMYK", (2, 2), (0, 255, 255, 0)), ".jpg", {(0, 0): RED}),
    ("1-bit", lambda: Image.frombytes("1", (8, 1), bytes([0b01000000])), ".png",
     {(0, 0): BLACK, (1, 0): WHITE}),
    ("L", lambda: Image.new("L", (2, 2), 77), ".png", {(0, 0): (77, 77, 77)}),
    ("RGB with a transparent colour", lambda: rgb_keyed(), ".png",
     {(0, 0): WHITE, (1, 0): RED}),
]


@pytest.mark.parametrize("name, make, suffix, expected", CASES, ids=[c[0] for c in CASES])
def test_every_mode_becomes_the_rgb_a_person_sees(
    name: str, make, suffix: str, expected: dict, tmp_path: Path
) -> None:
    image = make()
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == image.size
    for xy, colour in expected.items():
        assert rgb.getpixel(xy) == pytest.approx(colour, abs=3 if suffix == ".jpg" else 1), xy
    path = tmp_path / f"img{suffix}"
    image.save(path)
    loaded = load_image(path)  # what training and evaluation read
    for xy, colour in expected.items():
        assert loaded.getpixel(xy) == pytest.approx(colour, abs=3 if suffix == ".jpg" else 1), xy


def test_a_bare_convert_gets_these_wrong() -> None:
    # The reference code's convert("RGB") shows the black under the transparent background and
    # clips 16-bit grey (32896 = half) to white: the expectations above catch a return to it.
    transparent, deep = palette_with_transparency(), grey16()
    assert transparent.convert("RGB").getpixel((0, 0)) == BLACK
    assert to_rgb(transparent).getpixel((0, 0)) == WHITE
    assert deep.convert("RGB").getpixel((1, 0)) == WHITE
    assert to_rgb(deep).getpixel((1, 0)) == (128, 128, 128)


def broken_images(folder: Path) -> dict[str, Path]:
    """Files that exist but are no usable images."""
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "good.jpg"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(good, quality=95)
    data = good.read_bytes()
    files = {
        "garbage": b"this is not an image at all",
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "zeros": bytes(len(data)),
    }
    out = {}
    for name, content in files.items():
        out[name] = folder / f"{name}.jpg"
        out[name].write_bytes(content)
    return out


def test_undecodable_images_are_named_with_the_reason(tmp_path: Path) -> None:
    bad = broken_images(tmp_path)
    for name, path in bad.items():
        with pytest.raises(CLBenchError, match=f"cannot read image .*{name}.jpg: .+"):
            open_rgb(path)
    good = tmp_path / "good.jpg"
    problems = verify_images([*bad.values(), good], workers=2).problems
    assert set(problems) == set(bad.values())
    assert "truncated" in problems[bad["truncated"]].lower()


def test_verified_images_are_remembered_until_they_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (4, 4), (i, i, i)).save(paths[-1])
    decoded: list[Path] = []
    real = tasks.images.decode_problem

    def counting(path: Path) -> str | None:
        decoded.append(path)
        return real(path)

    monkeypatch.setattr(tasks.images, "decode_problem", counting)
    cache = tmp_path / "cache" / "verified.txt"
    first = verify_images(paths, cache)
    assert first.problems == {} and (first.decoded, first.remembered) == (4, 0)
    assert sorted(decoded) == sorted(paths)
    decoded.clear()
    second = verify_images(paths, cache)
    assert decoded == [] and (second.decoded, second.remembered) == (0, 4)  # all remembered
    paths[2].write_bytes(b"broken now")  # changed: size and time differ
    problems = verify_images(paths, cache).problems
    assert decoded == [paths[2]] and set(problems) == {paths[2]}
    decoded.clear()
    verify_images(paths, cache)
    assert decoded == [paths[2]]  # a failed image is never remembered as verified


def test_a_cache_that_cannot_be_written_only_costs_time(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(image)
    (tmp_path / "a-file").write_text("not a folder")
    assert verify_images([image], tmp_path / "a-file" / "verified.txt").problems == {}
