"""Deterministic synthetic shapes dataset for quick CPU demos and tests.

    python -m dataset.synthetic --out data/demo [--num_train N --num_test N
                                                 --height H --width W --seed S]

writes train.tfrecords, val.tfrecords, test.tfrecords and classes.txt to --out.

Classes (num_classes = 6):
  0 void        1-2 px band around every object's edge (ignored by the loss)
  1 background  smooth two-colour texture with noise
  2 disc
  3 rectangle   random aspect ratio and rotation
  4 triangle    equilateral, random rotation
  5 ring        annulus; its hole shows what lies beneath

A pixel's class is decided by the shape only: every object's colour is drawn
from the same distribution whatever its class, so colour alone cannot tell
the shape classes apart. Objects have random size, position and rotation and
may overlap (later ones on top). Defaults: 64x128 images, 400 train and 100
test examples. Each example is drawn from its own seed (seed, split, index),
so the same arguments give byte-identical records.
"""

import argparse
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from common.errors import UserError

CLASS_NAMES = ("void", "background", "disc", "rectangle", "triangle", "ring")
NUM_CLASSES = len(CLASS_NAMES)
VOID, BACKGROUND, DISC, RECTANGLE, TRIANGLE, RING = range(NUM_CLASSES)
SHAPE_CLASSES = (DISC, RECTANGLE, TRIANGLE, RING)

DEFAULT_HEIGHT = 64
DEFAULT_WIDTH = 128
DEFAULT_NUM_TRAIN = 400
DEFAULT_NUM_TEST = 100
DEFAULT_NUM_VAL = 100  # held out for choosing criteria and thresholds
MIN_SIDE = 16
# What AdapNet++'s input sides must be a multiple of (its output stride,
# models/architecture.py, which dataset/ does not import): the --height and
# --width help; any size is written.
NETWORK_SIZE_MULTIPLE = 16

_SPLIT_IDS = {"train": 0, "test": 1, "val": 2}
_MIN_OBJECTS, _MAX_OBJECTS = 3, 6
# Objects whose colour is this close to the background under them are
# redrawn, so shapes stay visible; the rule ignores the class.
_MIN_CONTRAST = 60.0
_NOISE_STD = 6.0


def _shape_mask(shape_class, rng, ys, xs, size, centre):
    """Boolean HxW mask of one shape of radius-like size at centre."""
    cy, cx = centre
    dy, dx = ys - cy, xs - cx
    angle = rng.uniform(0.0, 2.0 * np.pi)
    cos_a, sin_a = np.cos(angle), np.sin(angle)
    # Coordinates in the shape's own rotated frame.
    u = dx * cos_a + dy * sin_a
    v = -dx * sin_a + dy * cos_a
    if shape_class == DISC:
        return dx * dx + dy * dy <= size * size
    if shape_class == RING:
        inner = size * rng.uniform(0.45, 0.6)
        squared = dx * dx + dy * dy
        return (squared <= size * size) & (squared >= inner * inner)
    if shape_class == RECTANGLE:
        half_long = size * rng.uniform(0.8, 1.1)
        half_short = size * rng.uniform(0.45, 0.9)
        return (np.abs(u) <= half_long) & (np.abs(v) <= half_short)
    if shape_class == TRIANGLE:
        # Equilateral with circumradius 1.3*size: inside all three edges'
        # half-planes, each at distance circumradius/2 from the centre.
        inradius = 0.65 * size
        inside = np.ones(ys.shape, bool)
        for edge in range(3):
            normal = np.pi / 2 + edge * 2.0 * np.pi / 3.0
            inside &= u * np.cos(normal) + v * np.sin(normal) <= inradius
        return inside
    raise ValueError(f"not a shape class: {shape_class}")


def _erode(mask):
    """4-neighbour erosion; pixels outside the image count as inside."""
    padded = np.pad(mask, 1, mode="edge")
    return (mask & padded[:-2, 1:-1] & padded[2:, 1:-1]
            & padded[1:-1, :-2] & padded[1:-1, 2:])


def _dilate(mask):
    return ~_erode(~mask)


def _background(rng, ys, xs, height, width):
    colour_a = rng.uniform(0, 255, 3)
    colour_b = rng.uniform(0, 255, 3)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(0.5, 2.0) * max(height, width)
    phase = rng.uniform(0, 2 * np.pi)
    along = xs * np.cos(angle) + ys * np.sin(angle)
    blend = 0.5 + 0.5 * np.sin(2 * np.pi * along / period + phase)
    # A second, finer wave gives the texture some structure besides noise.
    fine = 0.15 * np.sin(2 * np.pi * (xs * np.sin(angle) - ys * np.cos(angle))
                         / rng.uniform(4.0, 12.0))
    blend = np.clip(blend + fine, 0.0, 1.0)[..., None]
    return colour_a * (1.0 - blend) + colour_b * blend


def render_example(rng, height=DEFAULT_HEIGHT, width=DEFAULT_WIDTH):
    """One (image_bgr uint8 HxWx3, label uint8 HxW) drawn from rng."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    image = _background(rng, ys, xs, height, width)
    label = np.full((height, width), BACKGROUND, np.uint8)
    short_side = min(height, width)
    for _ in range(rng.integers(_MIN_OBJECTS, _MAX_OBJECTS + 1)):
        shape_class = SHAPE_CLASSES[rng.integers(len(SHAPE_CLASSES))]
        size = max(4.0, short_side * rng.uniform(0.14, 0.32))
        centre = (rng.uniform(0, height), rng.uniform(0, width))
        mask = _shape_mask(shape_class, rng, ys, xs, size, centre)
        if not mask.any():
            continue
        under = image[int(min(centre[0], height - 1)), int(min(centre[1], width - 1))]
        for _attempt in range(10):
            colour = rng.uniform(0, 255, 3)
            if np.linalg.norm(colour - under) >= _MIN_CONTRAST:
                break
        # Gentle linear shading so objects are not perfectly flat.
        gradient = rng.uniform(-1.0, 1.0, 2) * 30.0 / size
        shading = (ys - centre[0]) * gradient[0] + (xs - centre[1]) * gradient[1]
        image[mask] = colour + shading[mask][:, None]
        interior = _erode(mask)
        label[_dilate(mask) & ~interior] = VOID
        label[interior] = shape_class
    image += rng.normal(0.0, _NOISE_STD, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


def generate_examples(count, height=DEFAULT_HEIGHT, width=DEFAULT_WIDTH, seed=0,
                      split="train"):
    """Yield count examples of a split; example i depends only on (seed, split, i)."""
    _check_sizes(count=count, height=height, width=width)
    split_id = _SPLIT_IDS[split]
    for index in range(count):
        rng = np.random.default_rng([seed, split_id, index])
        yield render_example(rng, height, width)


def _check_sizes(count, height, width):
    for name, value, minimum in (("count", count, 1), ("height", height, MIN_SIDE),
                                 ("width", width, MIN_SIDE)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                or value < minimum:
            raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")


def generate(out_dir, num_train=DEFAULT_NUM_TRAIN, num_test=DEFAULT_NUM_TEST,
             height=DEFAULT_HEIGHT, width=DEFAULT_WIDTH, seed=0, num_val=DEFAULT_NUM_VAL):
    """Write train, val and test .tfrecords and classes.txt; returns their paths."""
    from dataset.records import encode_example, record_writer

    _check_sizes(count=num_train, height=height, width=width)
    _check_sizes(count=num_test, height=height, width=width)
    _check_sizes(count=num_val, height=height, width=width)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    paths = {}
    for split, count in (("train", num_train), ("val", num_val), ("test", num_test)):
        path = os.path.join(out_dir, f"{split}.tfrecords")
        with record_writer(path) as writer:
            for image, label in generate_examples(count, height, width, seed, split):
                writer.write(encode_example(image, label))
        paths[split] = path
    paths["classes"] = os.path.join(out_dir, "classes.txt")
    with open(paths["classes"], "w", encoding="utf-8") as handle:
        handle.writelines(f"{index} {name}\n" for index, name in enumerate(CLASS_NAMES))
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Write a synthetic shapes dataset (AdapNet++ TFRecords, "
                    f"num_classes = {NUM_CLASSES}: {', '.join(CLASS_NAMES)}).")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num_train", type=int, default=DEFAULT_NUM_TRAIN)
    parser.add_argument("--num_test", type=int, default=DEFAULT_NUM_TEST)
    parser.add_argument("--num_val", type=int, default=DEFAULT_NUM_VAL)
    parser.add_argument("--height", type=int, default=DEFAULT_HEIGHT,
                        help=f"image height (AdapNet++ needs a multiple of "
                             f"{NETWORK_SIZE_MULTIPLE})")
    parser.add_argument("--width", type=int, default=DEFAULT_WIDTH,
                        help=f"image width (AdapNet++ needs a multiple of "
                             f"{NETWORK_SIZE_MULTIPLE})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from common.runtime import import_tensorflow_quietly
    import_tensorflow_quietly()
    try:
        paths = generate(args.out, args.num_train, args.num_test, args.height,
                         args.width, args.seed, args.num_val)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.num_train} train, {args.num_val} val and {args.num_test} test "
          f"examples ({args.height}x{args.width}, num_classes {NUM_CLASSES}) to "
          f"{os.path.dirname(paths['train'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
