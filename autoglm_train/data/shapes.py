"""The embedded synthetic dataset: coloured shapes on a 2x2 grid, with captions that describe them.

Written once as webdataset shards (deterministic from a seed) so the default job needs no download.
Each sample: ``png`` image bytes and ``json`` with ``{"id", "captions": [..], "split", "shapes"}``
(``shapes``: ``[kind, colour, size, row, col]`` each); several captions per image (the shapes listed in
two orders) exercise the multi-caption retrieval protocol. Held-out captions are unique across images, so
R@1 is well defined.

Every held-out image belongs to a hard-negative group: images drawn from the same scene that differ only
in the shape, colour, position or size of one of its shapes (json ``group`` and ``varies``). Colour,
size and position alone tell most random scenes apart, so a held-out set of random scenes can be
retrieved without ever looking at shape; within a group only the varied attribute can, and validation
reports each attribute's within-group R@1. Half of the training images come in such groups too, written
one after another, so a small shuffle buffer puts them in one batch as each other's negatives.

After them the held-out split holds ``binding`` groups: scenes of two or three shapes that exchange one
attribute (colour, shape, size or cell) between two of their shapes, so every caption of the group holds
the same words and only how they bind tells them apart, which a bag of words cannot (ARO's attribute
and relation tests). They are scored within their groups only (``data.group_only``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, astuple, dataclass, replace
from pathlib import Path

import webdataset as wds
from filelock import FileLock
from PIL import Image, ImageDraw

from autoglm_train.utils.files import atomic_write_text

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 2: larger shapes; held-out hard-negative groups; training families. 3: binding groups
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 220, 40),
    "purple": (150, 60, 200),
    "cyan": (40, 210, 220),
    "orange": (240, 140, 30),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle", "diamond")
# a 2x2 grid: at 64 px a cell is 32 px, so a small shape is 18 px across and a large one 28 (v1's 3x3 grid
# left 9 px for a small shape, 2 pixels of ResNet's stride-4 stem, and shape was never learnt)
GRID = 2
ROWS = ("top", "bottom")
COLS = ("left", "right")
CELLS = tuple((row, col) for row in range(GRID) for col in range(GRID))
SIZES = {"small": 0.28, "large": 0.44}  # radius as a fraction of one grid cell's side
# what a hard-negative group varies (one attribute of one shape), and how many images a group has
GROUP_ATTRIBUTES = {
    "shape": len(SHAPES),
    "colour": 4,
    "position": len(CELLS),
    "size": len(SIZES),
    "binding": 3,
}
# what the first n_val held-out images' groups vary, in turn (binding groups come after them)
HELD_OUT_ATTRIBUTES = ("shape", "colour", "position", "size")
# what a binding group exchanges between two shapes: the Shape field, None for the cell
BINDING_SWAPS = {"colour": "colour", "shape": "kind", "size": "size", "position": None}


def position_name(row: int, col: int) -> str:
    return f"the {ROWS[row]} {COLS[col]}"


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    row: int
    col: int

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.kind} at {position_name(self.row, self.col)}"


def captions_for(shapes: list[Shape]) -> list[str]:
    """Two phrasings: reading order and its reverse (identical for a single shape)."""
    ordered = sorted(shapes, key=lambda s: (s.row, s.col))
    forward = " and ".join(s.phrase() for s in ordered)
    if len(ordered) == 1:
        return [forward, "there is " + forward]
    return [forward, " and ".join(s.phrase() for s in reversed(ordered))]


def sample_shapes(rng: random.Random, max_shapes: int = 3, min_shapes: int = 1) -> list[Shape]:
    n = rng.choice(range(min_shapes, max_shapes + 1))
    cells = rng.sample(CELLS, n)
    return [
        Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES)), r, c) for r, c in cells
    ]


def render(shapes: list[Shape], rng: random.Random, image_size: int = 64) -> Image.Image:
    """Draws from ``rng`` the same number of times whatever the shapes' attributes, so scenes rendered
    from equal generator states differ only where their shapes differ (a hard-negative group's images)."""
    background = tuple(rng.randint(0, 50) for _ in range(3))
    img = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(img)
    cell = image_size / GRID
    for s in shapes:
        radius = SIZES[s.size] * cell
        slack = max(0.0, cell / 2 - radius - 1)  # jitter inside the cell, never across its border
        cx = (s.col + 0.5) * cell + rng.uniform(-1, 1) * slack
        cy = (s.row + 0.5) * cell + rng.uniform(-1, 1) * slack
        colour = tuple(min(255, max(0, v + rng.randint(-20, 20))) for v in COLOURS[s.colour])
        box = [cx - radius, cy - radius, cx + radius, cy + radius]
        if s.kind == "circle":
            draw.ellipse(box, fill=colour)
        elif s.kind == "square":
            draw.rectangle(box, fill=colour)
        elif s.kind == "triangle":
            draw.polygon(
                [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour
            )
        else:  # diamond
            draw.polygon(
                [(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)], fill=colour
            )
    return img


def vary(base: list[Shape], attribute: str, rng: random.Random, size: int) -> list[list[Shape]]:
    """Up to ``size`` scenes, the first ``base``, that differ from each other only in ``attribute`` of one
    shape (chosen at random; its index is kept, so rendering draws the same jitter and tints for every
    scene). Fewer when the grid has fewer free cells than a position group asks for."""
    index = rng.randrange(len(base))
    shape = base[index]
    if attribute == "position":
        taken = {(s.row, s.col) for s in base}
        free = [cell for cell in CELLS if cell not in taken]
        places = rng.sample(free, min(size - 1, len(free)))  # a full grid leaves fewer places
        variants = [replace(shape, row=r, col=c) for r, c in places]
    else:
        field, values = {"shape": ("kind", SHAPES), "colour": ("colour", COLOURS), "size": ("size", SIZES)}[
            attribute
        ]
        others = [v for v in values if v != getattr(shape, field)]
        variants = [replace(shape, **{field: v}) for v in rng.sample(others, size - 1)]
    return [base] + [[*base[:index], v, *base[index + 1 :]] for v in variants]


def _swapped(scene: list[Shape], i: int, j: int, swap: str) -> list[Shape]:
    a, b = scene[i], scene[j]
    field = BINDING_SWAPS[swap]
    if field is None:  # the two shapes change cells; each keeps its list index, so its jitter and tint
        a, b = replace(a, row=b.row, col=b.col), replace(b, row=a.row, col=a.col)
    else:
        a, b = replace(a, **{field: getattr(b, field)}), replace(b, **{field: getattr(a, field)})
    out = list(scene)
    out[i], out[j] = a, b
    return out


def _differ(a: Shape, b: Shape, swap: str) -> bool:
    """Whether exchanging ``swap`` between two shapes (in distinct cells) makes another scene."""
    field = BINDING_SWAPS[swap]
    if field is None:  # two shapes alike but for their cells would only trade places
        return (a.kind, a.colour, a.size) != (b.kind, b.colour, b.size)
    return getattr(a, field) != getattr(b, field)


def can_bind(scene: list[Shape]) -> bool:
    """Whether a binding group can be made of the scene: two shapes of it that are not alike."""
    return any(_differ(a, b, "position") for a in scene for b in scene)


def bind_swaps(base: list[Shape], rng: random.Random, size: int) -> tuple[str, list[list[Shape]]]:
    """``(swap, scenes)``: up to ``size`` scenes, the first ``base`` (two shapes or more), each other one
    ``base`` with ``swap`` (an attribute, or the cell) exchanged between one pair of its shapes. Their
    captions are permutations of the same words, and no two scenes are the same (shapes sit in distinct
    cells, so exchanging differing values always changes the scene)."""
    if not can_bind(base):
        raise ValueError("a binding group needs a scene of two shapes or more, not all alike")
    swap = rng.choice([s for s in BINDING_SWAPS if any(_differ(a, b, s) for a in base for b in base)])
    pairs = [
        (i, j) for i in range(len(base)) for j in range(i + 1, len(base)) if _differ(base[i], base[j], swap)
    ]
    rng.shuffle(pairs)
    scenes, seen = [base], {frozenset(base)}
    for i, j in pairs:
        if len(scenes) == size:
            break
        scene = _swapped(base, i, j, swap)
        if frozenset(scene) not in seen:
            seen.add(frozenset(scene))
            scenes.append(scene)
    return swap, scenes


def _sample(key: str, scene: list[Shape], image_seed: int, image_size: int, meta: dict) -> dict:
    buf = io.BytesIO()
    render(scene, random.Random(image_seed), image_size).save(buf, format="PNG", optimize=False)
    return {
        "__key__": key,
        "png": buf.getvalue(),
        "json": json.dumps(
            {"id": key, "captions": captions_for(scene), "shapes": [astuple(s) for s in scene], **meta}
        ).encode(),
    }


def generate(
    n: int,
    seed: int,
    split: str,
    unique_captions: bool,
    image_size: int,
    group_fraction: float = 0.0,
    part: int | None = None,
    first: int = 0,
    attributes: Sequence[str] = HELD_OUT_ATTRIBUTES,
    seen: set[str] | None = None,
) -> Iterator[dict]:
    """``n`` samples. A fraction ``group_fraction`` of them (1.0: all) come in hard-negative groups, written
    one after another: images that differ only in the shape, colour, position or size of one shape, the
    attribute cycling group by group. Their json carries ``group`` (a name shared by the group) and
    ``varies`` (the attribute). ``unique_captions``: no caption appears twice in the split. ``part``: an
    independent stream of the split (one per training shard, so shards can be written in parallel);
    sample keys count from ``first``. ``seen``: captions that must not recur (with ``unique_captions``),
    shared with a stream written before this one; the captions written are added to it."""
    rng = random.Random(f"{seed}-{split}" if part is None else f"{seed}-{split}-{part}")
    seen = set() if seen is None else seen
    made = grouped = groups = 0
    while made < n:
        base = sample_shapes(rng)
        image_seed = rng.getrandbits(63)
        if grouped < group_fraction * (made + 1):  # keeps the share of grouped images at the fraction
            attribute = attributes[groups % len(attributes)]
            meta = {"split": split, "group": f"{split}-g{groups:06d}", "varies": attribute}
            size = min(GROUP_ATTRIBUTES[attribute], n - made)
            if attribute == "binding":
                while not can_bind(base):
                    base = sample_shapes(rng, min_shapes=2)
                meta["swaps"], scenes = bind_swaps(base, rng, size)
            else:
                scenes = vary(base, attribute, rng, size)
        else:
            scenes, meta = [base], {"split": split}
        captions = [c for scene in scenes for c in captions_for(scene)]
        if unique_captions and any(c in seen for c in captions):
            continue
        seen.update(captions)
        groups += len(scenes) > 1
        grouped += len(scenes) if len(scenes) > 1 else 0
        for scene in scenes:
            yield _sample(f"{split}{first + made:07d}", scene, image_seed, image_size, meta)
            made += 1


@dataclass(frozen=True)
class ShapesSpec:
    n_train: int = 60_000
    n_val: int = 1_000
    seed: int = 0
    image_size: int = 64
    samples_per_shard: int = 5_000
    val_shards: int = 4  # several, so evaluation can be sharded over ranks and workers
    # training images that come in hard-negative groups (written together, so with a small shuffle buffer
    # they meet in one batch); every held-out image is in one
    train_group_fraction: float = 0.5
    # what training groups vary, in turn: shape twice as often as the rest (colour, size and position are
    # learnt from random scenes alone within the default job; shape is the last attribute learnt)
    train_group_attributes: tuple[str, ...] = ("shape", "colour", "shape", "size", "shape", "position")
    # held-out binding groups after the n_val images (scored within their groups only)
    n_val_binding: int = 250


def spec_key(spec: ShapesSpec) -> str:
    """A short name for a spec: its shards live in ``<out_dir>/<spec_key>/``."""
    text = json.dumps({"format": FORMAT_VERSION, **asdict(spec)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def write_shapes_shards(out_dir: str | Path, **spec_kwargs) -> dict[str, list[str]]:
    """Write train/val shards under ``out_dir/<spec_key>/`` unless that spec's shards are already there.

    Returns ``{"train": [paths], "val": [paths]}``. Each spec has its own directory, so making one set
    never touches another that a running job may be reading. The manifest is written last (atomically),
    so an interrupted generation is redone, never half-used; a file lock per spec keeps concurrent
    processes (ranks, runs) from generating the same set at once.
    """
    if "train_group_attributes" in spec_kwargs:  # a list from the config
        spec_kwargs["train_group_attributes"] = tuple(spec_kwargs["train_group_attributes"])
    unknown = set(spec_kwargs.get("train_group_attributes", ())) - set(GROUP_ATTRIBUTES)
    if unknown:
        raise ValueError(f"train_group_attributes: {sorted(unknown)} not among {list(GROUP_ATTRIBUTES)}")
    spec = ShapesSpec(**spec_kwargs)
    out = Path(out_dir) / spec_key(spec)
    out.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out / ".lock")):
        # as the manifest holds it (JSON: tuples read back as lists)
        want = json.loads(json.dumps({"format": FORMAT_VERSION, **asdict(spec)}))
        manifest = _read_manifest(out, want)
        if manifest is None:
            manifest = _write(out, spec)
    return {split: [str(out / name) for name in names] for split, names in manifest["splits"].items()}


def _read_manifest(out: Path, want: dict) -> dict | None:
    """The manifest if it describes a complete set of this spec; None (regenerate) otherwise, a
    truncated or unreadable manifest included."""
    path = out / "manifest.json"
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        names = [n for names in manifest["splits"].values() for n in names]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
        log.info("shapes manifest %s is unreadable (%s); regenerating", path, exc)
        return None
    if manifest.get("spec") == want and names and all((out / n).exists() for n in names):
        return manifest
    log.info("shapes shards in %s are incomplete or of another spec; regenerating", out)
    return None


def _write_shard(job: tuple[Path, ShapesSpec, str, int, int, int]) -> None:
    path, spec, split, n, part, first = job
    with wds.TarWriter(str(path)) as sink:
        for sample in generate(
            n,
            spec.seed,
            split,
            False,
            spec.image_size,
            spec.train_group_fraction,
            part,
            first,
            spec.train_group_attributes,
        ):
            sink.write(sample)


def _write(out: Path, spec: ShapesSpec) -> dict:
    start = time.perf_counter()
    (out / "manifest.json").unlink(missing_ok=True)  # until the new set is whole, it is not a set
    for leftover in out.glob(".staging-*"):  # a killed generation's; the lock says none is running now
        shutil.rmtree(leftover, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".staging-") as staging:
        # training shards are independent streams, written in parallel; the held-out split is one
        # stream (its captions are unique across it)
        sizes = [
            min(spec.samples_per_shard, spec.n_train - first)
            for first in range(0, spec.n_train, spec.samples_per_shard)
        ]
        jobs = [
            (Path(staging) / f"train-{part:06d}.tar", spec, "train", n, part, part * spec.samples_per_shard)
            for part, n in enumerate(sizes)
        ]
        # the binding groups share the val_shards shards: ranks (and FSDP's collectives) get even shares
        per_val_shard = max(1, math.ceil((spec.n_val + spec.n_val_binding) / spec.val_shards))
        workers = min(len(jobs), os.cpu_count() or 1, 8)
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                list(pool.map(_write_shard, jobs))
        else:
            for job in jobs:
                _write_shard(job)
        with wds.ShardWriter(str(Path(staging) / "val-%06d.tar"), maxcount=per_val_shard, verbose=0) as sink:
            seen: set[str] = set()
            for sample in generate(spec.n_val, spec.seed, "val", True, spec.image_size, 1.0, seen=seen):
                sink.write(sample)
            # a stream of its own: the n_val images before it are those of a set without binding groups
            binding = generate(
                spec.n_val_binding, spec.seed, "val-binding", True, spec.image_size, 1.0, None, spec.n_val,
                ("binding",), seen,
            )  # fmt: skip
            for sample in binding:
                sink.write(sample)
        splits = {
            split: sorted(p.name for p in Path(staging).glob(f"{split}-*.tar")) for split in ("train", "val")
        }
        # renamed, never rewritten in place: a reader holding an old copy keeps reading it whole
        for shard in Path(staging).glob("*.tar"):
            os.replace(shard, out / shard.name)
    manifest = {
        "spec": {"format": FORMAT_VERSION, **asdict(spec)},
        "splits": splits,
        "sizes": {"train": spec.n_train, "val": spec.n_val + spec.n_val_binding},
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1))
    log.info(
        "wrote %d train + %d val shapes samples to %s in %.1fs",
        spec.n_train,
        spec.n_val + spec.n_val_binding,
        out,
        time.perf_counter() - start,
    )
    return manifest
