"""The embedded synthetic dataset: coloured shapes on a 3x3 grid, with captions that describe them.

Written once as webdataset shards (deterministic from a seed) so the default job needs no download.
Each sample: ``png`` image bytes and ``json`` with ``{"id", "captions": [..], "split"}``; several
captions per image (the shapes listed in two orders) exercise the multi-caption retrieval protocol.
Held-out captions are unique across images, so R@1 is well defined.
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
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import webdataset as wds
from filelock import FileLock
from PIL import Image, ImageDraw

from autoglm_train.utils.files import atomic_write_text

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
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
SIZES = {"small": 0.22, "large": 0.42}  # radius as a fraction of one grid cell's side
ROWS = ("top", "middle", "bottom")
COLS = ("left", "centre", "right")


def position_name(row: int, col: int) -> str:
    if row == 1 and col == 1:
        return "the centre"
    if row == 1:
        return f"the {COLS[col]}"
    if col == 1:
        return f"the {ROWS[row]}"
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


def sample_shapes(rng: random.Random, max_shapes: int = 3) -> list[Shape]:
    n = rng.choice(range(1, max_shapes + 1))
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], n)
    return [
        Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES)), r, c) for r, c in cells
    ]


def render(shapes: list[Shape], rng: random.Random, image_size: int = 64) -> Image.Image:
    background = tuple(rng.randint(0, 50) for _ in range(3))
    img = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(img)
    cell = image_size / 3
    for s in shapes:
        radius = SIZES[s.size] * cell
        slack = cell / 2 - radius - 1  # jitter inside the cell, never across its border
        cx = (s.col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (s.row + 0.5) * cell + rng.uniform(-slack, slack)
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


def generate(n: int, seed: int, split: str, unique_captions: bool, image_size: int) -> Iterator[dict]:
    rng = random.Random(f"{seed}-{split}")
    seen: set[str] = set()
    made = 0
    while made < n:
        shapes = sample_shapes(rng)
        captions = captions_for(shapes)
        if unique_captions and any(c in seen for c in captions):
            continue
        seen.update(captions)
        buf = io.BytesIO()
        render(shapes, rng, image_size).save(buf, format="PNG", optimize=False)
        key = f"{split}{made:07d}"
        yield {
            "__key__": key,
            "png": buf.getvalue(),
            "json": json.dumps({"id": key, "captions": captions, "split": split}).encode(),
        }
        made += 1


@dataclass(frozen=True)
class ShapesSpec:
    n_train: int = 60_000
    n_val: int = 1_000
    seed: int = 0
    image_size: int = 64
    samples_per_shard: int = 5_000
    val_shards: int = 4  # several, so evaluation can be sharded over ranks and workers


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
    spec = ShapesSpec(**spec_kwargs)
    out = Path(out_dir) / spec_key(spec)
    out.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out / ".lock")):
        manifest = _read_manifest(out, {"format": FORMAT_VERSION, **asdict(spec)})
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


def _write(out: Path, spec: ShapesSpec) -> dict:
    start = time.perf_counter()
    (out / "manifest.json").unlink(missing_ok=True)  # until the new set is whole, it is not a set
    for leftover in out.glob(".staging-*"):  # a killed generation's; the lock says none is running now
        shutil.rmtree(leftover, ignore_errors=True)
    splits: dict[str, list[str]] = {}
    plan = (
        ("train", spec.n_train, False, spec.samples_per_shard),
        ("val", spec.n_val, True, max(1, math.ceil(spec.n_val / spec.val_shards))),
    )
    with tempfile.TemporaryDirectory(dir=out, prefix=".staging-") as staging:
        for split, n, unique, per_shard in plan:
            pattern = str(Path(staging) / f"{split}-%06d.tar")
            with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
                for sample in generate(n, spec.seed, split, unique, spec.image_size):
                    sink.write(sample)
            splits[split] = sorted(p.name for p in Path(staging).glob(f"{split}-*.tar"))
        # renamed, never rewritten in place: a reader holding an old copy keeps reading it whole
        for shard in Path(staging).glob("*.tar"):
            os.replace(shard, out / shard.name)
    manifest = {
        "spec": {"format": FORMAT_VERSION, **asdict(spec)},
        "splits": splits,
        "sizes": {"train": spec.n_train, "val": spec.n_val},
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1))
    log.info(
        "wrote %d train + %d val shapes samples to %s in %.1fs",
        spec.n_train,
        spec.n_val,
        out,
        time.perf_counter() - start,
    )
    return manifest
