"""Micro general benchmarks in the formats of the real ones: MME-style yes/no pairs and POPE.

MME: each image has two questions, one answered "Yes" and one "No" (accuracy+ needs both
right), in four categories. POPE: each image has three objects it contains (yes) and three it
does not (no), the negatives sampled by POPE's rules: random (any absent object), popular (the
most frequent objects of the data set) and adversarial (the objects that most often co-occur
with the image's objects). The POPE scenes come from a sampler with a skewed object frequency
and with co-occurring similar objects (same shape or same colour), so that the three settings
differ as they do on COCO; frequencies and co-occurrences are counted on a reference sample of
that sampler's scenes.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image

from tasks.micro import draw
from tasks.micro.general import ALL_KINDS, YES_NO_SUFFIX, mme_pair, name
from tasks.micro.records import Example
from tasks.micro.scene import Kind, article, place
from tasks.micro.world import balanced, rng_for

MME_CATEGORIES = ("existence", "count", "position", "colour")
POPE_SPLITS = ("random", "popular", "adversarial")
POPE_PER_IMAGE = 3  # positives (and negatives) per image, as in POPE
def mme_question(text: str) -> str:
    return text + YES_NO_SUFFIX


@dataclass
class BenchImage:
    """One benchmark image and its questions."""

    image: Image.Image
    questions: list[Example]


def generate_mme(seed: int, n_questions: int, size: int) -> Iterator[BenchImage]:
    """MME-style pairs: ``n_questions // 2`` images, each with a Yes and a No question."""
    n_pairs = max(1, n_questions // 2)
    plan = balanced(n_pairs, MME_CATEGORIES, rng_for(seed, "bench-mme", "plan"))
    for i, category in enumerate(plan):
        rng = rng_for(seed, "bench-mme", i)
        things, yes, no = mme_pair(rng, category)
        extra = {"category": category}
        yield BenchImage(draw.scene_image(things, size, rng), [
            Example(mme_question(yes), "Yes", extra=dict(extra)),
            Example(mme_question(no), "No", extra=dict(extra)),
        ])


@dataclass(frozen=True)
class PopeStats:
    """Object frequencies and co-occurrence counts of the POPE scene distribution."""

    frequency: Counter
    cooccurrence: dict[Kind, Counter]


class PopeSampler:
    """Scenes with a skewed object prior in which each object has two companions (similar
    objects: same shape or same colour) that tend to appear with it."""

    def __init__(self, seed: int) -> None:
        rng = rng_for(seed, "pope-prior")
        self.kinds = list(ALL_KINDS)
        rng.shuffle(self.kinds)
        self.weights = [1 / (rank + 1) ** 0.9 for rank in range(len(self.kinds))]
        self.companions = {
            k: rng.sample([o for o in ALL_KINDS if o != k and (o[0] == k[0] or o[1] == k[1])], 2)
            for k in ALL_KINDS
        }

    def kinds_of_scene(self, rng: random.Random) -> list[Kind]:
        """3-5 objects of at least three kinds; later objects are often companions."""
        while True:
            kinds = [self.draw(rng)]
            for _ in range(rng.randint(2, 4)):
                if rng.random() < 0.6:
                    kinds.append(rng.choice(self.companions[rng.choice(kinds)]))
                else:
                    kinds.append(self.draw(rng))
            if len(set(kinds)) >= POPE_PER_IMAGE:
                return kinds

    def draw(self, rng: random.Random) -> Kind:
        return rng.choices(self.kinds, self.weights)[0]

    def stats(self, seed: int, n_scenes: int = 2000) -> PopeStats:
        """Frequencies and co-occurrences over a reference sample of scenes."""
        frequency: Counter = Counter()
        cooccurrence: dict[Kind, Counter] = {k: Counter() for k in ALL_KINDS}
        for i in range(n_scenes):
            present = set(self.kinds_of_scene(rng_for(seed, "pope-stats", i)))
            frequency.update(present)
            for a in present:
                cooccurrence[a].update(present - {a})
        return PopeStats(frequency, cooccurrence)


def pope_negatives(present: set[Kind], positives: list[Kind], split: str, stats: PopeStats,
                   rng: random.Random) -> list[Kind]:
    """Three absent objects chosen by POPE's rule for ``split``."""
    absent = [k for k in ALL_KINDS if k not in present]
    if split == "random":
        return rng.sample(absent, POPE_PER_IMAGE)
    if split == "popular":
        score = {k: stats.frequency[k] for k in absent}
    else:
        score = {k: sum(stats.cooccurrence[p][k] for p in positives) for k in absent}
    return sorted(absent, key=lambda k: (-score[k], ALL_KINDS.index(k)))[:POPE_PER_IMAGE]


@dataclass
class PopeImage:
    """One POPE image and its questions per split."""

    image: Image.Image
    questions: dict[str, list[Example]]


def generate_pope(seed: int, n_questions: int, size: int) -> Iterator[PopeImage]:
    """POPE: ``ceil(n_questions / 6)`` images, each with 3 yes and 3 no questions per split."""
    n_images = max(1, -(-n_questions // (2 * POPE_PER_IMAGE)))
    sampler = PopeSampler(seed)
    stats = sampler.stats(seed)
    for i in range(n_images):
        rng = rng_for(seed, "bench-pope", i)
        kinds = sampler.kinds_of_scene(rng)
        present = set(kinds)
        positives = rng.sample(sorted(present), POPE_PER_IMAGE)
        things = place(kinds, rng)
        questions = {}
        for split in POPE_SPLITS:
            negatives = pope_negatives(present, positives, split, stats, rng)
            qs = []
            for pos, neg in zip(positives, negatives, strict=True):
                qs.append(pope_question(pos, "yes", split))
                qs.append(pope_question(neg, "no", split))
            questions[split] = qs
        yield PopeImage(draw.scene_image(things, size, rng), questions)


def pope_question(kind: Kind, answer: str, split: str) -> Example:
    return Example(f"Is there {article(kind[0])} {name(kind)} in the image?", answer,
                   extra={"category": split, "object": name(kind)})
