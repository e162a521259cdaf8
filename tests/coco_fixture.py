"""A tiny COCO Captions download, generated: images, 2017 captions files and a Karpathy split file.

    from coco_fixture import make_coco_fixture   # tests/ is on sys.path under pytest, as for conftest
    fx = make_coco_fixture(tmp_path, n_images=12)
    convert(fx["images"], fx["captions_files"], tmp_path / "coco", karpathy=fx["karpathy"])

Laid out like the real thing, so the converter (and an end-to-end training test on its shards) sees what it
would see on a real machine:

    root/images/train2017/000000000100.jpg ...     32x32 JPEGs, one solid colour per image
    root/images/val2017/...
    root/annotations/captions_train2017.json       {"images": [...], "annotations": [...]}
    root/annotations/captions_val2017.json
    root/dataset_coco.json                         Karpathy: {"images": [{"cocoid", "split", ...}]}

Image ids are ``image_ids(n_images)`` (sparse, like COCO's), listed in the jsons in descending order and
with annotations interleaved across images, so a converter that relies on input order shows it. One caption
per image carries stray whitespace; ``expected["captions"]`` holds them stripped.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

COLOURS = ("red", "green", "blue", "yellow", "purple", "cyan", "orange", "white", "black", "grey")


def image_ids(n_images: int) -> list[int]:
    """The ids the fixture uses, ascending: sparse and not starting at 0, like COCO's."""
    return [100 + 13 * k for k in range(n_images)]


def _colour(k: int) -> tuple[int, int, int]:
    return (k * 53 % 256, k * 97 % 256, (k * 193 + 40) % 256)


def _captions(image_id: int, k: int, n: int) -> list[str]:
    name = COLOURS[k % len(COLOURS)]
    raw = [f"a {name} square, picture {image_id}, caption {j}" for j in range(n)]
    raw[0] = f"  {raw[0]} \n"  # COCO captions do carry stray whitespace
    return raw


def _karpathy_splits(ids: list[int], n_test: int, n_val: int) -> dict[int, str]:
    """test and val drawn from a fixed shuffle; the rest alternate train / restval."""
    order = ids[:]
    random.Random(0).shuffle(order)
    splits = {i: "test" for i in order[:n_test]}
    splits.update({i: "val" for i in order[n_test : n_test + n_val]})
    for j, i in enumerate(order[n_test + n_val :]):
        splits[i] = "train" if j % 2 == 0 else "restval"
    return splits


def _write_captions_json(path: Path, ids: list[int], captions: dict[int, list[str]]) -> None:
    images = [
        {"id": i, "file_name": f"{i:012d}.jpg", "height": 32, "width": 32} for i in sorted(ids, reverse=True)
    ]
    annotations = []
    n_max = max((len(captions[i]) for i in ids), default=0)
    for j in range(n_max):  # interleaved across images, each image's captions in order
        for i in sorted(ids, reverse=True):
            if j < len(captions[i]):
                annotations.append({"image_id": i, "id": i * 100 + j, "caption": captions[i][j]})
    path.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": annotations}))


def make_coco_fixture(
    root: Path,
    n_images: int = 12,
    captions_per_image: int = 5,
    n_test: int = 4,
    n_val: int = 2,
    missing: tuple[int, ...] | list[int] = (),
) -> dict:
    """Write a COCO-format fixture under ``root`` and return its paths and what a conversion should give.

    ``n_test`` and ``n_val`` images go to the Karpathy test and val splits, the rest to train and restval
    (so n_images > n_test + n_val). Every third image (ids[2], ids[5], ...) is in val2017, the others in
    train2017. ``missing``: image ids (from ``image_ids``) the jsons list but whose files are not written.

    Returns a dict:
      ``root``, ``images`` (the --images folder), ``captions_files`` ([train, val] 2017 jsons), ``karpathy``;
      ``ids`` (all ids, ascending), ``missing`` (sorted);
      ``splits`` (Karpathy: ``{"train": ids incl. restval, "val": ids, "test": ids}``, ascending, files
      present or not), ``splits_2017`` (``{"train": ids, "val": ids}`` by captions file);
      ``captions`` (``{id: [stripped captions in annotation order]}``), ``files`` (``{id: image path}``,
      for the written images only).
    """
    if n_images <= n_test + n_val:
        raise ValueError(f"n_images={n_images} must exceed n_test + n_val = {n_test + n_val}")
    root = Path(root)
    ids = image_ids(n_images)
    unknown = set(missing) - set(ids)
    if unknown:
        raise ValueError(f"missing ids {sorted(unknown)} are not fixture ids {ids}")
    raw = {i: _captions(i, k, captions_per_image) for k, i in enumerate(ids)}
    splits_2017 = {"train": [i for k, i in enumerate(ids) if k % 3 != 2], "val": ids[2::3]}

    files: dict[int, Path] = {}
    for split, split_ids in splits_2017.items():
        folder = root / "images" / f"{split}2017"
        folder.mkdir(parents=True, exist_ok=True)
        for i in split_ids:
            if i in missing:
                continue
            path = folder / f"{i:012d}.jpg"
            Image.new("RGB", (32, 32), _colour(ids.index(i))).save(path, format="JPEG", quality=90)
            files[i] = path

    annotations = root / "annotations"
    annotations.mkdir(parents=True, exist_ok=True)
    captions_files = [annotations / f"captions_{split}2017.json" for split in ("train", "val")]
    for path, split in zip(captions_files, ("train", "val"), strict=True):
        _write_captions_json(path, splits_2017[split], raw)

    karpathy_split = _karpathy_splits(ids, n_test, n_val)
    karpathy = root / "dataset_coco.json"
    karpathy_images = []
    for i in ids:
        folder = "val2014" if karpathy_split[i] in ("val", "test", "restval") else "train2014"
        karpathy_images.append(
            {
                "cocoid": i,
                "filepath": folder,
                "filename": f"COCO_{folder}_{i:012d}.jpg",
                "split": karpathy_split[i],
                "sentences": [{"raw": c.strip(), "tokens": c.split()} for c in raw[i]],
            }
        )
    karpathy.write_text(json.dumps({"dataset": "coco", "images": karpathy_images}))

    splits = {
        split: sorted(i for i, s in karpathy_split.items() if s in wanted)
        for split, wanted in (("train", ("train", "restval")), ("val", ("val",)), ("test", ("test",)))
    }
    return {
        "root": root,
        "images": root / "images",
        "captions_files": captions_files,
        "karpathy": karpathy,
        "ids": ids,
        "missing": sorted(missing),
        "splits": splits,
        "splits_2017": splits_2017,
        "captions": {i: [c.strip() for c in raw[i]] for i in ids},
        "files": files,
    }
