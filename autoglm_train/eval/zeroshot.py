"""Zero-shot classification: a classifier made from class names and prompt templates, no training.

Each class is described by several prompts (``"a photo of a {}."`` formatted with the class name); their
text embeddings are averaged and re-normalized into one row of the classifier (CLIP's prompt ensemble),
and an image is assigned the class whose row is most similar to its embedding.

Datasets come as an image folder (``root/<class>/*.jpg``, like torchvision's ImageFolder) or as webdataset
shards whose ``json`` holds a label. The synthetic shapes set has its own zero-shot tasks (shape and
colour) built from images with exactly one shape, with prompts in the words of the training captions.

Pure torch (+ PIL, webdataset): nothing here knows about Lightning, Hydra or training.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from autoglm_train.data.shapes import CELLS, COLOURS, SHAPES, SIZES, Shape, position_name, render
from autoglm_train.data.shards import IMAGE_KEYS, expand_shards, read_image

Encoder = Callable[[torch.Tensor], torch.Tensor]
Transform = Callable[[Image.Image], torch.Tensor]
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------- classifier and accuracy


@torch.no_grad()
def build_classifier(
    encode_text: Encoder,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Class embeddings ``[num_classes, dim]`` (fp32, unit rows) from prompt ensembles.

    Every template is ``str.format``-ed with the class name; the prompts are encoded in batches of
    ``batch_size`` (all classes together, so few calls), each embedding normalized (again: a model's own
    normalization may run in lower precision), averaged over templates, and the mean re-normalized.
    Averaging over many phrasings cancels what one wording adds and keeps what the class name adds.
    The caller puts the model in eval mode.
    """
    if not classnames or not templates:
        raise ValueError("zero-shot classification needs at least one class name and one template")
    texts = [t.format(name) for name in classnames for t in templates]
    chunks = [
        F.normalize(encode_text(tokenizer(texts[i : i + batch_size]).to(device)).float(), dim=-1)
        for i in range(0, len(texts), batch_size)
    ]
    per_prompt = torch.cat(chunks).view(len(classnames), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


@torch.no_grad()
def embed_images(
    encode_image: Encoder, batches: Batches, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """All image embeddings (fp32, on ``device``) and their labels (on cpu), concatenated."""
    embs, labels = [], []
    for images, y in batches:
        embs.append(encode_image(images.to(device)).float())
        labels.append(torch.as_tensor(y).cpu())
    if not embs:
        raise ValueError("zero-shot evaluation got no images")
    return torch.cat(embs), torch.cat(labels)


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, topk: Sequence[int] = (1, 5)
) -> dict[str, float | int | list[float]]:
    """``top{k}`` for each k, ``samples``, ``per_class`` top-1 and ``mean_per_class``, from ``[N, C]`` logits.

    Top-k is clipped to the number of classes C: with k >= C every prediction is a hit, so ``top5`` of a
    4-class task is 1.0 by construction. It is still reported under its name so every task has the same
    keys; read it as meaningless when C <= k. ``per_class[c]`` is NaN for a class without samples, and
    ``mean_per_class`` (balanced accuracy) averages the classes that have samples.
    """
    labels = labels.to(logits.device).long()
    num_classes = logits.shape[1]
    kmax = min(max(topk), num_classes)
    match = logits.topk(kmax, dim=1).indices == labels[:, None]
    out: dict[str, float | int | list[float]] = {
        f"top{k}": match[:, : min(k, num_classes)].any(dim=1).float().mean().item() for k in topk
    }
    correct = match[:, 0].float()
    counts = torch.bincount(labels, minlength=num_classes).float()
    hits = torch.bincount(labels, weights=correct, minlength=num_classes)
    per_class = (hits / counts).tolist()  # 0/0 = nan for classes without samples
    present = counts > 0
    out["samples"] = int(labels.numel())
    out["per_class"] = per_class
    out["mean_per_class"] = (hits[present] / counts[present]).mean().item()
    return out


def zeroshot_accuracy(
    encode_image: Encoder, classifier: torch.Tensor, batches: Batches, topk: Sequence[int] = (1, 5)
) -> dict[str, float | int | list[float]]:
    """Zero-shot accuracy of ``(images, labels)`` batches against ``classifier`` rows (logits = emb @ W^T).

    Returns ``top{k}`` for each k in ``topk`` (clipped to the number of classes: with 4 classes ``top5`` is
    1.0 by construction), ``samples``, ``per_class`` (top-1 per class, NaN where a class has no samples)
    and ``mean_per_class``. Images are moved to the classifier's device; the caller sets eval mode.
    """
    emb, labels = embed_images(encode_image, batches, classifier.device)
    return classification_metrics(emb @ classifier.float().T, labels, topk)


# --------------------------------------------------------------------------- datasets


def _batched(
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
                    with Image.open(path) as img:
                        yield img.convert("RGB"), label

    return _batched(samples(), transform, batch_size)


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

    return _batched(samples(), transform, batch_size)


# --------------------------------------------------------------------------- the shapes zero-shot tasks


def _shapes_templates(slot: str) -> list[str]:
    """Every ``a {size} {colour} {shape} at {position}`` phrase with ``slot`` left as ``{}``.

    Training captions only ever use these words in this order, so a prompt for one class averages over
    every value of the nuisance words (size, position and the other attribute) rather than guessing one:
    the shape task's prompt for "circle" never names a colour the image may not have, and vice versa.
    """
    positions = [position_name(r, c) for r, c in CELLS]
    colours = ["{}"] if slot == "colour" else list(COLOURS)
    kinds = ["{}"] if slot == "shape" else list(SHAPES)
    return [f"a {size} {c} {k} at {p}" for size in SIZES for c in colours for k in kinds for p in positions]


# shape: 4 classes x 144 prompts (2 sizes x 8 colours x 9 places); colour: 8 x 72 (2 sizes x 4 shapes x 9)
SHAPES_TASKS: dict[str, tuple[list[str], list[str]]] = {
    "shape": (list(SHAPES), _shapes_templates("shape")),
    "colour": (list(COLOURS), _shapes_templates("colour")),
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


@torch.no_grad()
def evaluate_shapes_zeroshot(
    encode_image: Encoder,
    encode_text: Encoder,
    tokenizer: Callable[[list[str]], torch.Tensor],
    transform: Transform,
    n: int = 400,
    seed: int = 12345,
    image_size: int = 64,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """``zeroshot/shape_top1``, ``zeroshot/colour_top1`` and ``zeroshot/colour_top5`` on the shapes set.

    The images are embedded once and scored against both tasks' classifiers. Shape top-5 is left out: with
    4 classes it is 1.0 by construction. Chance is 1/4 (shape) and 1/8, 5/8 (colour top-1, top-5).
    The caller puts the model in eval mode.
    """
    tasks = (("shape", (1,)), ("colour", (1, 5)))
    pairs = [
        (image, [SHAPES_TASKS[task][0].index(meta[task]) for task, _ in tasks])
        for image, meta in shapes_zeroshot_samples(n, seed, image_size)
    ]
    emb, labels = embed_images(encode_image, _batched(pairs, transform, batch_size), device)  # labels [N, 2]
    out: dict[str, float] = {}
    for column, (task, topk) in enumerate(tasks):
        classnames, templates = SHAPES_TASKS[task]
        classifier = build_classifier(encode_text, tokenizer, classnames, templates, device=device)
        metrics = classification_metrics(emb @ classifier.T, labels[:, column], topk)
        out |= {f"zeroshot/{task}_top{k}": float(metrics[f"top{k}"]) for k in topk}
    return out
