"""A synthetic fine-grained "birds" dataset, drawn with PIL, for runs without real data.

Every species is a combination of four part attributes: beak (short, long, hooked, conical),
wing bars (none, one, two), eye ring (absent, present) and tail (round, forked, long): 72
species. Above 72 species a fifth attribute, a head crest (absent, present), doubles the choice
to 144 (at 72 or fewer every bird is crestless, so those sets are unchanged by it). Body,
wing and beak colours are drawn per image from one palette shared by all species, so colour
alone says nothing about the class; telling species apart means looking at small parts. Each
image has a random pose (flip, rotation, scale, position), a cluttered background of branches,
leaves and bird-coloured blobs, and sometimes a leaf occluding part of the bird. The training
split is long-tailed; val and test have the same number of images per class.

Generation is deterministic: each image's random state comes from (seed, split, class, index)
only, and the shards are written with fixed mtimes, so the same options give the same bytes.
"""

from __future__ import annotations

import io
import itertools
import math
import random
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageDraw

from .shards import Sample, write_dataset

BEAKS = ("short", "long", "hooked", "conical")
WING_BARS = (0, 1, 2)
EYE_RINGS = (False, True)
TAILS = ("round", "forked", "long")
CRESTS = (False, True)  # used only above len(BEAKS) * len(WING_BARS) * len(EYE_RINGS) * len(TAILS) species
PALETTE = [  # body colours shared by every species
    (196, 160, 112), (120, 96, 72), (90, 110, 140), (150, 60, 50), (210, 190, 90),
    (80, 120, 80), (170, 170, 170), (60, 60, 70), (200, 120, 60), (130, 90, 150),
]
CANVAS = 192  # the canonical bird is drawn on a CANVAS x CANVAS layer, facing right


def species_table(num_classes: int, seed: int) -> list[tuple[str, int, bool, str, bool]]:
    """``num_classes`` distinct attribute combinations ``(beak, bars, ring, tail, crest)``, chosen
    with ``seed``, in a fixed order."""
    crestless = [(*combo, False) for combo in itertools.product(BEAKS, WING_BARS, EYE_RINGS, TAILS)]
    combos = crestless if num_classes <= len(crestless) else list(
        itertools.product(BEAKS, WING_BARS, EYE_RINGS, TAILS, CRESTS))
    if not 2 <= num_classes <= len(combos):
        raise ValueError(f"--num-classes = {num_classes}: expected 2..{len(crestless) * len(CRESTS)}")
    return random.Random(f"demo-species:{seed}").sample(combos, num_classes)


def species_name(beak: str, bars: int, ring: bool, tail: str, crest: bool) -> str:
    return f"{beak}-beak_{bars}-bar_{'ringed' if ring else 'plain'}-eye_{tail}-tail" + ("_crested" if crest else "")


def _jitter(rng: random.Random, colour: tuple[int, int, int], amount: int = 25) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in colour)


def draw_bird(rng: random.Random, beak: str, bars: int, ring: bool, tail: str, crest: bool) -> Image.Image:
    """The canonical bird (facing right) on a transparent CANVAS x CANVAS RGBA layer."""
    layer = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    body = _jitter(rng, rng.choice(PALETTE)) + (255,)
    wing = _jitter(rng, tuple(int(c * 0.7) for c in body[:3])) + (255,)
    beak_colour = _jitter(rng, rng.choice([(40, 35, 30), (220, 150, 40), (150, 140, 120)])) + (255,)
    bar_colour = _jitter(rng, (240, 236, 220), 15) + (255,)
    # tail first, so the body covers its root
    if tail == "round":
        draw.ellipse((24, 86, 66, 114), fill=wing)
    elif tail == "forked":
        draw.polygon([(62, 94), (14, 74), (30, 98)], fill=wing)
        draw.polygon([(62, 106), (14, 126), (30, 102)], fill=wing)
    else:
        draw.polygon([(62, 95), (4, 90), (4, 106), (62, 105)], fill=wing)
    for x in (84, 108):  # legs
        draw.line((x, 118, x + rng.randint(-4, 4), 142), fill=(60, 50, 40, 255), width=4)
    draw.ellipse((52, 74, 140, 126), fill=body)
    draw.ellipse((70, 84, 124, 112), fill=wing)
    for i in range(bars):
        x = 90 + 16 * i
        draw.line((x, 86, x - 6, 110), fill=bar_colour, width=6)
    if crest:  # behind the head, so only the feathers above it show
        draw.polygon([(124, 66), (116, 40), (132, 58), (134, 34), (144, 58), (154, 44), (152, 66)], fill=wing)
    draw.ellipse((118, 56, 162, 100), fill=body)  # head, centre (140, 78)
    if beak == "short":
        draw.polygon([(158, 72), (158, 86), (174, 79)], fill=beak_colour)
    elif beak == "long":
        draw.polygon([(158, 74), (158, 84), (190, 80)], fill=beak_colour)
    elif beak == "hooked":
        draw.polygon([(157, 70), (174, 72), (180, 86), (170, 82), (157, 86)], fill=beak_colour)
    else:
        draw.polygon([(154, 66), (154, 92), (176, 79)], fill=beak_colour)
    if ring:
        draw.ellipse((136, 62, 156, 82), outline=(250, 250, 250, 255), width=5)
    draw.ellipse((142, 68, 150, 76), fill=(10, 10, 10, 255))
    return layer


def _background(rng: random.Random, size: int) -> Image.Image:
    top, bottom = np.array(_jitter(rng, rng.choice(PALETTE), 60)), np.array(_jitter(rng, rng.choice(PALETTE), 60))
    t = np.linspace(0.0, 1.0, size)[:, None, None]  # (S, 1, 1)
    pixels = (top * (1 - t) + bottom * t) * np.ones((1, size, 1))  # (S, S, 3)
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(4, 9)):  # branches
        x0, y0 = rng.uniform(-0.2, 1.2) * size, rng.uniform(0, 1) * size
        angle = rng.uniform(-0.6, 0.6)
        length = rng.uniform(0.4, 1.2) * size
        draw.line((x0, y0, x0 + length * math.cos(angle), y0 + length * math.sin(angle)),
                  fill=_jitter(rng, (90, 70, 50), 30), width=max(1, round(size * rng.uniform(0.01, 0.04))))
    for _ in range(rng.randint(6, 14)):  # leaves and bird-coloured blobs
        cx, cy, r = rng.uniform(0, 1) * size, rng.uniform(0, 1) * size, rng.uniform(0.03, 0.1) * size
        colour = _jitter(rng, rng.choice(PALETTE + [(70, 140, 60), (50, 110, 50)]), 30)
        draw.ellipse((cx - r, cy - r * 0.6, cx + r, cy + r * 0.6), fill=colour)
    return image


def render_image(seed: int, split: str, label: int, index: int, attributes: tuple, size: int) -> tuple[Image.Image, list[float]]:
    """One demo image and the bird's bounding box ``[x, y, w, h]``."""
    rng = random.Random(f"demo:{seed}:{split}:{label}:{index}")
    bird = draw_bird(rng, *attributes)
    angle = rng.uniform(-25, 25)
    flip = rng.random() < 0.5
    side = max(8, round(size * rng.uniform(0.6, 1.0)))
    bird = bird.resize((side, side), Image.BOX).rotate(angle, resample=Image.BILINEAR)
    if flip:
        bird = bird.transpose(Image.FLIP_LEFT_RIGHT)
    image = _background(rng, size).convert("RGBA")
    x, y = rng.randint(-side // 6, size - side + side // 6), rng.randint(-side // 6, size - side + side // 6)
    image.alpha_composite(bird, (max(0, x), max(0, y)), (max(0, -x), max(0, -y)))
    left, top, right, bottom = bird.getchannel("A").getbbox() or (0, 0, side, side)
    x0, y0 = max(0, x + left), max(0, y + top)
    box = [float(x0), float(y0), float(min(size, x + right) - x0), float(min(size, y + bottom) - y0)]
    if rng.random() < 0.3:  # a leaf in front of part of the bird
        draw = ImageDraw.Draw(image)
        cx, cy = x0 + rng.uniform(0, box[2]), y0 + rng.uniform(0, box[3])
        r = rng.uniform(0.08, 0.16) * size
        draw.ellipse((cx - r, cy - r * 0.5, cx + r, cy + r * 0.5), fill=_jitter(rng, (60, 130, 55), 30) + (255,))
    return image.convert("RGB"), box


def class_sizes(num_classes: int, train_images: int, imbalance: float) -> list[int]:
    """Long-tailed training counts: class k gets ``n_0 * imbalance ** (-k / (C - 1))``, >= 2."""
    weights = [imbalance ** (-k / (num_classes - 1)) for k in range(num_classes)]
    return [max(2, round(train_images * w / sum(weights))) for w in weights]


def build_demo(
    out: Path | str,
    *,
    name: str = "demo_birds",
    num_classes: int = 12,
    train_images: int = 1200,
    val_per_class: int = 10,
    test_per_class: int = 15,
    imbalance: float = 10.0,
    image_size: int = 96,
    shard_size: int = 200,
    seed: int = 0,
    quality: int = 90,
) -> Path:
    """Generate the demo birds as shards with a manifest in ``out/NAME``.

    Args:
        out: the parent folder.
        name: the dataset name.
        num_classes: species, 2..144 (crests appear above 72).
        train_images: about this many training images, long-tailed over the species.
        val_per_class: validation images per species.
        test_per_class: test images per species.
        imbalance: ratio of the most to the least frequent species in train.
        image_size: side of the square JPEGs in pixels.
        shard_size: the most samples per shard.
        seed: the seed of everything.
        quality: JPEG quality.

    Returns:
        The dataset folder.
    """
    table = species_table(num_classes, seed)
    classes = [species_name(*attributes) for attributes in table]
    sizes = {
        "train": class_sizes(num_classes, train_images, imbalance),
        "val": [val_per_class] * num_classes,
        "test": [test_per_class] * num_classes,
    }

    def split_samples(split: str) -> Iterable[Sample]:
        order = [(label, index) for label, n in enumerate(sizes[split]) for index in range(n)]
        random.Random(f"demo-order:{seed}:{split}").shuffle(order)
        for position, (label, index) in enumerate(order):
            image, box = render_image(seed, split, label, index, table[label], image_size)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=quality)
            yield Sample(
                key=f"{name}_{split}_{position:07d}",
                data=buffer.getvalue(),
                ext="jpg",
                label=label,
                meta={"species": classes[label], "dataset": name, "path": f"synthetic/{split}/{label:03d}/{index:05d}.jpg",
                      "split": split, "bbox": box},
            )

    options = dict(num_classes=num_classes, train_images=train_images, val_per_class=val_per_class,
                   test_per_class=test_per_class, imbalance=imbalance, image_size=image_size,
                   shard_size=shard_size, seed=seed, quality=quality)
    return write_dataset({split: split_samples(split) for split in sizes if sum(sizes[split])}, classes,
                         Path(out), name, shard_size=shard_size, skipped=[], options=options, source="synthetic",
                         split_sizes={split: sum(counts) for split, counts in sizes.items()})  # equal shard sizes
