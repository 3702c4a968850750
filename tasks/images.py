"""Reading images as the model sees them, and proving up front that every image decodes.

``to_rgb`` converts any PIL mode to 8-bit RGB the way a person would see the image: transparent
pixels are composited on white (LLaVA's reference code calls a bare ``convert("RGB")``, which
shows whatever colour hides under transparent pixels, often black, e.g. an icon drawn on
nothing), 16- and 32-bit grey levels are scaled to 0..255 instead of clipped (a bare convert
turns a 16-bit PNG almost white), float images in 0..1 are scaled by 255. Every other mode (1,
L, P, CMYK, YCbCr, ...) uses PIL's own conversion.

``verify_images`` opens and fully decodes every image once, in parallel with a progress bar,
and names the ones that fail with the reason. With a cache file it skips images verified before
whose size and modification time are unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from cl_bench.errors import CLBenchError, describe

ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
DEEP_GREY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
WHITE = (255, 255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB: alpha composited on white, deep grey levels scaled, not clipped."""
    if image.mode in DEEP_GREY_MODES:
        return Image.fromarray(_grey_to_8bit(image), "L").convert("RGB")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, WHITE), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _grey_to_8bit(image: Image.Image) -> np.ndarray:
    """Grey levels of a 16-bit, 32-bit integer or float image mapped to 0..255.

    16-bit modes and 32-bit integers above 255 divide by 257 (65535 -> 255; integers are first
    clipped to 0..65535); integers within 0..255 are kept. Floats within 0..1 scale by 255,
    other floats are clipped to 0..255 (NaN counts as 0).
    """
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
        scale = 255.0 if values.size and values.min() >= 0.0 and values.max() <= 1.0 else 1.0
        values = values * scale
    elif image.mode.startswith("I;16") or values.max(initial=0) > 255:
        values = np.clip(values, 0, 65535) / 257.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def open_rgb(path: Path) -> Image.Image:
    """The image at ``path``, fully decoded, as RGB; an unreadable file is a clear error."""
    try:
        with Image.open(path) as img:
            return to_rgb(img.copy() if img.mode == "RGB" else img)
    except Exception as err:  # noqa: BLE001 - PIL raises many types for corrupt files
        raise CLBenchError(f"cannot read image {path}: {describe(err)}") from None


def decode_problem(path: Path) -> str | None:
    """Why ``path`` is no usable image (not decodable, or not convertible to RGB), or None."""
    try:
        open_rgb(path)
    except CLBenchError as err:
        return str(err).removeprefix(f"cannot read image {path}: ")
    return None


# ---------------------------------------------------------------- verifying many images


def _stamp(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size} {stat.st_mtime_ns} {path}"


def cache_file(cache_dir: Path, image_root: Path) -> Path:
    """Where the images verified under ``image_root`` are remembered."""
    key = hashlib.sha1(str(image_root.resolve()).encode()).hexdigest()[:16]
    return cache_dir / f"{key}.txt"


@dataclass(frozen=True)
class Verified:
    """What ``verify_images`` did: the images that failed (with why), how many it decoded and
    how many it skipped as verified before and unchanged."""

    problems: dict[Path, str]
    decoded: int
    remembered: int


def verify_images(
    paths: Iterable[Path], cache: Path | None = None, workers: int | None = None,
) -> Verified:
    """Decode every image once (threads, with a progress bar) and name those that fail.
    ``cache`` (a text file) lists images verified before by size, modification time and path:
    those are skipped, and the newly verified ones are added."""
    paths = list(dict.fromkeys(paths))
    known: set[str] = set()
    if cache is not None and cache.is_file():
        with contextlib.suppress(OSError, UnicodeDecodeError):
            known = set(cache.read_text(encoding="utf-8").splitlines())
    stamps = {p: _stamp(p) for p in paths}
    todo = [p for p in paths if stamps[p] not in known]
    workers = workers or min(16, os.cpu_count() or 1)
    problems: dict[Path, str] = {}
    with ThreadPoolExecutor(workers) as pool, tqdm(
        total=len(todo), desc="decoding images", unit="img", disable=len(todo) < 500,
    ) as bar:
        for path, problem in zip(todo, pool.map(decode_problem, todo, chunksize=32), strict=True):
            bar.update()
            if problem is not None:
                problems[path] = problem
    if cache is not None and todo:
        remember(cache, known | {stamps[p] for p in todo if p not in problems})
    return Verified(problems, len(todo), len(paths) - len(todo))


def remember(cache: Path, verified: set[str]) -> None:
    """Write the verified images' stamps (temporary file, then rename); a cache that cannot be
    written (a read-only home, say) only costs decoding again next time."""
    partial = cache.with_suffix(f".{os.getpid()}.tmp")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text("".join(f"{line}\n" for line in sorted(verified)), encoding="utf-8")
        partial.replace(cache)
    except OSError:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
