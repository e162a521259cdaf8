"""Labelled images for zero-shot evaluation: an image folder (``root/<class>/*.jpg``, like torchvision's
ImageFolder) or webdataset shards whose ``json`` holds a label, as ``(images, labels)`` batches.

Pure torch + PIL + webdataset: what eval/zeroshot.py scores, without knowing where it came from.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image

from autoglm_train.data.shards import IMAGE_KEYS, expand_shards, open_image, read_image, to_rgb

Transform = Callable[[Image.Image], torch.Tensor]


def batched(
    samples: Iterable[tuple[Image.Image, object]], transform: Transform, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Transformed images stacked, labels as one tensor (an int each, or a row of ints each)."""
    images: list[torch.Tensor] = []
    labels: list = []
    for image, label in samples:
        images.append(transform(image))
        labels.append(label)
        if len(images) == batch_size:
            yield torch.stack(images), torch.tensor(labels)
            images, labels = [], []
    if images:
        yield torch.stack(images), torch.tensor(labels)


def image_folder_classes(root: str | Path) -> list[str]:
    """Folder names under ``root``, sorted (the label of a folder is its index here, as in ImageFolder)."""
    classes = sorted(p.name for p in Path(root).iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"no class folders under {root}")
    return classes


def prompt_names(classes: Sequence[str]) -> list[str]:
    """Folder names as words for prompts: ``golden_retriever`` -> ``golden retriever``."""
    return [c.replace("_", " ") for c in classes]


def image_folder_batches(
    root: str | Path, transform: Transform, batch_size: int, classes: Sequence[str] | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` batches of ``root/<class>/*.{jpg,jpeg,png,webp}``, class by class, files sorted.

    ``classes`` defaults to ``image_folder_classes(root)``; labels index into it.
    """
    classes = list(classes) if classes is not None else image_folder_classes(root)
    extensions = {f".{k}" for k in IMAGE_KEYS}

    def samples() -> Iterator[tuple[Image.Image, int]]:
        for label, name in enumerate(classes):
            for path in sorted((Path(root) / name).iterdir()):
                if path.suffix.lower() in extensions:
                    # opened and converted as training reads shards: size refused from the header,
                    # 16-bit scaled, transparency onto the same background
                    with open_image(path.read_bytes()) as img:
                        yield to_rgb(img), label

    return batched(samples(), transform, batch_size)


def _label_index(value, classnames: Sequence[str], lookup: dict[str, int], where: str) -> int:
    if isinstance(value, bool):  # a bool is an int to Python, never a label here
        raise ValueError(f"label {value!r} of {where} is neither a class index nor a class name")
    if isinstance(value, int) and 0 <= value < len(classnames):
        return value
    if isinstance(value, str) and value in lookup:
        return lookup[value]
    raise ValueError(f"label {value!r} of {where} is neither a class index nor one of {list(classnames)[:8]}")


def labelled_shard_batches(
    shards: str | Sequence[str],
    transform: Transform,
    batch_size: int,
    classnames: Sequence[str],
    label_key: str = "label",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` batches of webdataset shards whose ``json`` holds ``label_key``.

    A label is an int index into ``classnames`` or a class name (underscores and spaces are interchangeable).
    A sample without a usable label raises instead of being skipped: a silently smaller evaluation set
    would change the accuracy without saying so. Reads every shard in this process (no rank split).
    """
    lookup = {name: i for i, name in enumerate(classnames)}
    lookup |= {name.replace("_", " "): i for i, name in enumerate(classnames)}
    lookup |= {name.replace(" ", "_"): i for i, name in enumerate(classnames)}

    def samples() -> Iterator[tuple[Image.Image, int]]:
        for sample in wds.DataPipeline(wds.SimpleShardList(expand_shards(shards)), wds.tarfile_to_samples()):
            where = f"{sample.get('__key__')} in {sample.get('__url__')}"
            meta = json.loads(sample["json"]) if "json" in sample else {}
            if not isinstance(meta, dict) or label_key not in meta:
                raise ValueError(f"sample {where} has no '{label_key}' in its json")
            yield read_image(sample), _label_index(meta[label_key], classnames, lookup, where)

    return batched(samples(), transform, batch_size)
