"""Zero-shot classification: a classifier made from class names and prompt templates, no training.

Each class is described by several prompts (``"a photo of a {}."`` formatted with the class name); their
text embeddings are averaged and re-normalized into one row of the classifier (CLIP's prompt ensemble),
and an image is assigned the class whose row is most similar to its embedding.

A task reaches this module as ``LabelledImages``: a source of ``(images, labels)`` batches and, for each
label column, a ``ZeroShotTask`` (class names, templates, top-k, metric names). Where the images come
from (an image folder, labelled shards: data/labelled.py; the shapes set: data/shapes_zeroshot.py) is
decided by the wiring (build.build_zeroshot), so nothing here knows a dataset.

Pure torch: nothing here knows about Lightning, Hydra or training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Encoder = Callable[[torch.Tensor], torch.Tensor]
Transform = Callable[[object], torch.Tensor]  # a PIL image -> a tensor
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

    Every template is ``str.format``-ed with the class name, at ``{}`` or ``{c}`` (clip_benchmark's
    templates name it); the prompts are encoded in batches of
    ``batch_size`` (all classes together, so few calls), each embedding normalized (again: a model's own
    normalization may run in lower precision), averaged over templates, and the mean re-normalized.
    Averaging over many phrasings cancels what one wording adds and keeps what the class name adds.
    The caller puts the model in eval mode.
    """
    if not classnames or not templates:
        raise ValueError("zero-shot classification needs at least one class name and one template")
    texts = [t.format(name, c=name) for name in classnames for t in templates]
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


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class ZeroShotTask:
    """One label column's classification: its classes, its prompt templates, the top-k it reports and the
    metric names (``top{k}``, ``mean_per_class``) written under ``prefix`` (``zeroshot/`` ->
    ``zeroshot/top1``)."""

    prefix: str
    classnames: Sequence[str]
    templates: Sequence[str]
    topk: tuple[int, ...] = (1, 5)
    report: tuple[str, ...] = ("top1", "top5", "mean_per_class")


@dataclass(frozen=True)
class LabelledImages:
    """Images for zero-shot tasks: ``batches(transform, batch_size)`` yields ``(images, labels)`` with one
    label column per task (labels ``[B]`` for a single task, ``[B, len(tasks)]`` for several). Several
    tasks on one set of images embed the images once."""

    batches: Callable[[Transform, int], Batches]
    tasks: Sequence[ZeroShotTask]


@torch.no_grad()
def evaluate_zeroshot(
    encode_image: Encoder,
    encode_text: Encoder,
    tokenizer: Callable[[list[str]], torch.Tensor],
    source: LabelledImages,
    transform: Transform,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Every task of ``source``: its reported metrics under its prefix. The caller sets eval mode."""
    emb, labels = embed_images(encode_image, source.batches(transform, batch_size), device)
    labels = labels[:, None] if labels.dim() == 1 else labels
    if labels.shape[1] != len(source.tasks):
        raise ValueError(f"{labels.shape[1]} label columns for {len(source.tasks)} zero-shot tasks")
    out: dict[str, float] = {}
    for column, task in enumerate(source.tasks):
        classifier = build_classifier(encode_text, tokenizer, task.classnames, task.templates, device=device)
        metrics = classification_metrics(emb @ classifier.T, labels[:, column], task.topk)
        out |= {f"{task.prefix}{name}": float(metrics[name]) for name in task.report}
    return out


def zeroshot_metrics(
    model, tokenizer, source: LabelledImages, transform: Transform, batch_size: int, device
) -> dict[str, float]:
    """``evaluate_zeroshot`` of a dual encoder (``encode_image``/``encode_text``), in eval mode; the
    model's mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        return evaluate_zeroshot(
            model.encode_image, model.encode_text, tokenizer, source, transform, batch_size, device
        )
    finally:
        model.train(was_training)
