"""clip_benchmark's zero-shot figures, under its metric names, computed by our evaluation code.

Classification (``acc1``, ``acc5``, ``mean_per_class_recall``): the prompt-ensemble classifier and top-k of
eval/zeroshot.py. clip_benchmark reports ``acc5`` as NaN below 5 classes (top-5 would then be a hit by
construction); it is left out there. Its mean per-class recall is scikit-learn's balanced accuracy of the
top-1 predictions: the recall of each class that has images, averaged, which is our ``mean_per_class``.

Retrieval (``image_retrieval_recall@k``: a caption finds its image among the top k images;
``text_retrieval_recall@k``: an image finds any of its captions among the top k captions): R@K of
eval/retrieval.py, where an image may have several captions, the same definition. k larger than the gallery
is clipped to it (clip_benchmark stops with an error there).

Inputs are batches, class names and templates only: data/clip_benchmark.py opens the datasets. The caller
sets eval mode and any autocast (the encoders may be wrapped in it); embeddings are compared in fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from autoglm_train.eval.retrieval import retrieval_metrics
from autoglm_train.eval.zeroshot import Encoder, build_classifier, classification_metrics, embed_images

Tokenizer = Callable[[list[str]], torch.Tensor]


def classification_figures(
    encode_image: Encoder,
    encode_text: Encoder,
    tokenizer: Tokenizer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    classnames: Sequence[str],
    templates: Sequence[str],
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """``acc1``, ``acc5`` (5 classes or more), ``mean_per_class_recall`` and ``samples`` of ``(images,
    labels)`` batches, labels indexing ``classnames``."""
    with torch.no_grad():
        classifier = build_classifier(encode_text, tokenizer, classnames, templates, device=device)
        emb, labels = embed_images(encode_image, batches, device)
    outside = labels[(labels < 0) | (labels >= len(classnames))]
    if outside.numel():
        raise ValueError(
            f"label {int(outside[0])} in the images, but the class names list {len(classnames)} classes "
            f"(labels index them from 0)"
        )
    topk = (1, 5) if len(classnames) >= 5 else (1,)
    # normalized again: an encoder under autocast may hand back half-precision rows
    metrics = classification_metrics(F.normalize(emb, dim=-1) @ classifier.T, labels, topk)
    out = {
        "acc1": float(metrics["top1"]),
        "mean_per_class_recall": float(metrics["mean_per_class"]),
        "samples": float(metrics["samples"]),
    }
    if 5 in topk:
        out["acc5"] = float(metrics["top5"])
    return out


def retrieval_figures(
    encode_image: Encoder,
    encode_text: Encoder,
    tokenizer: Tokenizer,
    batches: Iterable[tuple[torch.Tensor, Sequence[Sequence[str]]]],
    recall_k: Sequence[int] = (5,),
    device: str | torch.device = "cpu",
    chunk_size: int = 1024,
) -> dict[str, float]:
    """``image_retrieval_recall@k`` and ``text_retrieval_recall@k`` for each k, ``images`` and ``captions``,
    from ``(images, captions)`` batches where ``captions[i]`` lists image i's captions."""
    images, texts, owners = [], [], []
    seen = 0
    with torch.no_grad():
        for batch_images, captions in batches:
            images.append(F.normalize(encode_image(batch_images.to(device)).float(), dim=-1))
            flat = [c for per_image in captions for c in per_image]
            if flat:
                texts.append(F.normalize(encode_text(tokenizer(flat).to(device)).float(), dim=-1))
            owners += [seen + i for i, per_image in enumerate(captions) for _ in per_image]
            seen += len(captions)
    if not seen or not owners:
        raise ValueError(f"retrieval got {seen} images and {len(owners)} captions: it needs both")
    ks = tuple(sorted(set(int(k) for k in recall_k)))
    metrics = retrieval_metrics(
        torch.cat(images),
        torch.arange(seen, device=device),
        torch.cat(texts),
        torch.tensor(owners, device=device),
        ks=ks,
        chunk_size=chunk_size,
    )
    out = {"images": float(seen), "captions": float(len(owners))}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = metrics[f"t2i_r{k}"]
        out[f"text_retrieval_recall@{k}"] = metrics[f"i2t_r{k}"]
    return out
