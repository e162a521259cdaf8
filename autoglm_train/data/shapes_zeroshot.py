"""The embedded shapes set's zero-shot tasks: shape and colour of images with exactly one shape, with
prompts in the words of the training captions. eval/zeroshot.py scores them like any labelled images.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import torch
from PIL import Image

from autoglm_train.data.labelled import batched
from autoglm_train.data.shapes import CELLS, COLOURS, SHAPES, SIZES, Shape, position_name, render

# the tasks, in the label columns' order; shape top-5 is left out (4 classes: 1.0 by construction)
TASK_TOPK = {"shape": (1,), "colour": (1, 5)}


def shapes_templates(slot: str) -> list[str]:
    """Every ``a {size} {colour} {shape} at {position}`` phrase with ``slot`` left as ``{}``.

    Training captions only ever use these words in this order, so a prompt for one class averages over
    every value of the nuisance words (size, position and the other attribute) rather than guessing one:
    the shape task's prompt for "circle" never names a colour the image may not have, and vice versa.
    """
    positions = [position_name(r, c) for r, c in CELLS]
    colours = ["{}"] if slot == "colour" else list(COLOURS)
    kinds = ["{}"] if slot == "shape" else list(SHAPES)
    return [f"a {size} {c} {k} at {p}" for size in SIZES for c in colours for k in kinds for p in positions]


# shape: 4 classes x 64 prompts (2 sizes x 8 colours x 4 places); colour: 8 x 32 (2 sizes x 4 shapes x 4)
SHAPES_TASKS: dict[str, tuple[list[str], list[str]]] = {
    "shape": (list(SHAPES), shapes_templates("shape")),
    "colour": (list(COLOURS), shapes_templates("colour")),
}


def shapes_zeroshot_samples(n: int, seed: int, image_size: int) -> list[tuple[Image.Image, dict]]:
    """``n`` shapes images with exactly one shape each, labelled ``{"shape": kind, "colour": colour}``.

    Shapes and colours are balanced (each list cycles through its classes, then is shuffled, so counts
    differ by at most one and the two labels are drawn independently); size and cell are uniform. One
    shape per image makes the label unambiguous. Deterministic for a seed.
    """
    rng = random.Random(seed)
    kinds = [SHAPES[i % len(SHAPES)] for i in range(n)]
    colours = [list(COLOURS)[i % len(COLOURS)] for i in range(n)]
    rng.shuffle(kinds)
    rng.shuffle(colours)
    out = []
    for kind, colour in zip(kinds, colours, strict=True):
        shape = Shape(kind, colour, rng.choice(list(SIZES)), *rng.choice(CELLS))
        out.append((render([shape], rng, image_size), {"shape": kind, "colour": colour}))
    return out


def shapes_zeroshot_batches(
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int,
    n: int = 400,
    seed: int = 12345,
    image_size: int = 64,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` of ``shapes_zeroshot_samples``; labels ``[B, 2]``: the shape and colour
    indices (``SHAPES_TASKS``' class order), one column per task of ``TASK_TOPK``."""
    pairs = [
        (image, [SHAPES_TASKS[task][0].index(meta[task]) for task in TASK_TOPK])
        for image, meta in shapes_zeroshot_samples(n, seed, image_size)
    ]
    return batched(pairs, transform, batch_size)
