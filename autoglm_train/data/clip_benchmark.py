"""clip_benchmark's datasets from a local directory in the webdataset layout its converter
(``clip_benchmark_export_wds``, ``clip_benchmark.webdataset_builder``) writes, opened by clip_benchmark's own
builder, so the samples, class names and prompt templates are the ones its CLI evaluates:

    <root>/<split>/nshards.txt          the number of shards, read first
    <root>/<split>/0.tar, 1.tar, ...    a sample: an image (webp, png, jpg or jpeg) and its class (cls) or
                                        its captions (txt, one a line)
    <root>/classnames.txt               classification: one class name a line, in label order
    <root>/zeroshot_classification_templates.txt   classification: one prompt a line, {c} for the name
    <root>/dataset_type.txt             "retrieval" for a caption set; absent: classification

The task follows the directory (``dataset_type.txt``); clip_benchmark's multi-label sets (mean average
precision) are not read here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

CLASSIFICATION, RETRIEVAL = "zeroshot_classification", "zeroshot_retrieval"


@dataclass(frozen=True)
class BenchmarkSet:
    """One dataset split: its task, and for classification its class names and templates (from its files
    through clip_benchmark); ``batches(transform, batch_size, num_workers)`` yields ``(images, labels)``
    or ``(images, captions per image)`` as clip_benchmark's CLI batches them."""

    name: str
    task: str
    batches: Callable[[Callable, int, int], Iterable]
    classnames: Sequence[str] | None = None
    templates: Sequence[str] | None = None


def dataset_name(name: str) -> str:
    """The name without clip_benchmark's ``wds/`` prefix (both spellings are accepted)."""
    return name.removeprefix("wds/")


def dataset_type(root: str | Path) -> str:
    path = Path(root) / "dataset_type.txt"
    return path.read_text().strip().lower() if path.is_file() else "classification"


def layout_problems(root: str | Path, split: str) -> list[str]:
    """What the directory lacks for clip_benchmark's webdataset builder, one line each (empty: readable)."""
    root = Path(root)
    if not root.is_dir():
        return [f"{root} is not a directory"]
    nshards = root / split / "nshards.txt"
    if not nshards.is_file():
        splits = sorted(p.name for p in root.iterdir() if (p / "nshards.txt").is_file())
        return [f"{nshards} is missing (splits here: {', '.join(splits) or 'none'})"]
    try:
        count = int(nshards.read_text().strip())
    except ValueError:
        return [f"{nshards} must hold the number of shards, not {nshards.read_text().strip()!r}"]
    problems = [
        f"{root / split / f'{i}.tar'} is missing"
        for i in range(count)
        if not (root / split / f"{i}.tar").is_file()
    ]
    if count < 1:
        problems.append(f"{nshards} says {count} shards")
    kind = dataset_type(root)
    if kind not in ("classification", "retrieval"):
        problems.append(
            f"{root / 'dataset_type.txt'}: {kind!r} sets are not read here (classification or retrieval)"
        )
    if kind == "classification":
        problems += [
            f"{root / name} is missing: a classification set needs it"
            for name in ("classnames.txt", "zeroshot_classification_templates.txt")
            if not (root / name).is_file()
        ]
    return problems


def open_benchmark(name: str, root: str | Path, split: str = "test") -> BenchmarkSet:
    """The split of the dataset at ``root``, through ``clip_benchmark.datasets.builder.build_dataset``."""
    problems = layout_problems(root, split)
    if problems:
        raise FileNotFoundError(
            f"clip_benchmark dataset {name!r} at {root}: "
            + "; ".join(problems)
            + " (the layout clip_benchmark_export_wds writes)"
        )
    task = RETRIEVAL if dataset_type(root) == "retrieval" else CLASSIFICATION

    def build(transform):
        from clip_benchmark.datasets.builder import build_dataset

        return build_dataset(
            dataset_name=f"wds/{dataset_name(name)}",
            root=str(root),
            transform=transform,
            split=split,
            task=task,
        )

    shards = int((Path(root) / split / "nshards.txt").read_text().strip())

    def batches(transform, batch_size: int, num_workers: int = 0):
        import torch.utils.data

        # as clip_benchmark's CLI: the stream batches itself, the loader only runs it (in workers); a worker
        # per shard at most, since webdataset stops a worker that is left without one
        dataset = build(transform).batched(batch_size)
        workers = min(num_workers, shards)
        return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers)

    if task == RETRIEVAL:
        return BenchmarkSet(dataset_name(name), task, batches)
    described = build(None)  # the builder reads the class names and templates; no sample is read here
    return BenchmarkSet(dataset_name(name), task, batches, list(described.classes), list(described.templates))
