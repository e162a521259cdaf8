"""Recall@K for image->text and text->image retrieval, where an image may have several captions.

A query counts as a hit at K when any of its top-K results belongs to it: for an image, any of its
captions; for a caption, its image. Similarities are computed in chunks of queries, so memory stays at
chunk x gallery, never queries x gallery.
"""

from __future__ import annotations

import torch


def _hits_at_k(queries, query_ids, gallery, gallery_ids, ks, chunk_size) -> dict[int, float]:
    kmax = min(max(ks), gallery.shape[0])
    hits = {k: 0 for k in ks}
    for start in range(0, queries.shape[0], chunk_size):
        sims = queries[start : start + chunk_size] @ gallery.T
        top = sims.topk(kmax, dim=1).indices
        match = gallery_ids[top] == query_ids[start : start + chunk_size, None]
        for k in ks:
            hits[k] += int(match[:, :k].any(dim=1).sum())
    return {k: hits[k] / queries.shape[0] for k in ks}


@torch.no_grad()
def retrieval_metrics(
    image_emb: torch.Tensor,
    image_ids: torch.Tensor,
    text_emb: torch.Tensor,
    text_image_ids: torch.Tensor,
    ks: tuple[int, ...] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Keys ``i2t_r{k}``, ``t2i_r{k}`` and, where 1 is among ``ks``, ``r1_mean`` (fractions in [0, 1]).

    ``image_ids`` (N) identify images; ``text_image_ids`` (M) name each caption's image. Embeddings are
    compared by dot product (pass normalized embeddings for cosine similarity).
    """
    if image_emb.shape[0] == 0 or text_emb.shape[0] == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    if len(torch.unique(image_ids)) != len(image_ids):
        raise ValueError("image ids must be unique: the same image appears twice in the evaluation set")
    image_emb, text_emb = image_emb.float(), text_emb.float()
    for name, emb in (("image", image_emb), ("text", text_emb)):
        # NaN similarities still rank (topk puts them somewhere), which would read as a plausible recall
        bad = int((~torch.isfinite(emb)).any(dim=1).sum())
        if bad:
            raise ValueError(
                f"{bad} of {emb.shape[0]} {name} embeddings are not finite (NaN or inf): a diverged model"
            )
    i2t = _hits_at_k(image_emb, image_ids, text_emb, text_image_ids, ks, chunk_size)
    t2i = _hits_at_k(text_emb, text_image_ids, image_emb, image_ids, ks, chunk_size)
    out = {f"i2t_r{k}": v for k, v in i2t.items()} | {f"t2i_r{k}": v for k, v in t2i.items()}
    if 1 in ks:
        out["r1_mean"] = (out["i2t_r1"] + out["t2i_r1"]) / 2
    return out


def retrieval_rows(
    parts: dict[str, torch.Tensor], kinds: tuple[str, ...], group_only: tuple[str, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks of the images and captions retrieval scores: all but those in groups of a
    ``group_only`` kind (``parts``: ``id``, ``text_id`` and, with hard groups, ``group_kind``)."""
    images = torch.ones_like(parts["id"], dtype=torch.bool)
    if group_only and "group_kind" in parts:
        only = torch.tensor([kinds.index(k) for k in group_only], device=parts["group_kind"].device)
        images = ~torch.isin(parts["group_kind"], only)
    texts = torch.isin(parts["text_id"], parts["id"][images])
    return images, texts


@torch.no_grad()
def group_recall(
    image_emb: torch.Tensor,
    image_ids: torch.Tensor,
    text_emb: torch.Tensor,
    text_image_ids: torch.Tensor,
    image_groups: torch.Tensor,
    image_kinds: torch.Tensor,
    kinds: tuple[str, ...],
    sims: torch.Tensor | None = None,
) -> dict[str, float]:
    """``hard_r1_<kind>``: R@1 within hard-negative groups, the mean of both directions.

    A group is a set of images that differ in one attribute only (``image_groups`` names each image's group,
    ``image_kinds`` indexes ``kinds`` for what its group varies; -1: in none). An image is scored against
    the captions of its own group only, a caption against its group's images, so the figure says whether
    the model tells that attribute apart (chance: 1 / group size), whatever else it confuses. Groups of one
    image are left out. A kind without groups is left out of the result. ``sims`` [images, captions]: scores
    to rank by instead of the embeddings' dot products (the fusion stage's: eval/rerank.py); only pairs
    within a group are read.
    """
    device = image_emb.device  # the module gathers on the GPU it trains on; the row maps start on the host
    image_emb, text_emb = image_emb.float(), text_emb.float().to(device)
    image_groups, image_kinds = image_groups.to(device), image_kinds.to(device)
    row_of = {int(i): r for r, i in enumerate(image_ids.tolist())}
    text_rows = torch.tensor([row_of[int(i)] for i in text_image_ids.tolist()], device=device)
    text_groups = image_groups[text_rows]
    # only groups with two images or more
    _, inverse, counts = torch.unique(image_groups, return_inverse=True, return_counts=True)
    in_group = (image_kinds >= 0) & (counts[inverse] > 1)
    if sims is None:  # [N, M]; held-out sets are small, and only this pass needs the whole
        sims = image_emb @ text_emb.T
    sims = sims.to(device)
    same = image_groups[:, None] == text_groups[None, :]
    masked = sims.masked_fill(~same, float("-inf"))
    i2t_hit = text_rows[masked.argmax(dim=1)] == torch.arange(len(image_ids), device=device)
    t2i_hit = masked.argmax(dim=0) == text_rows
    out = {}
    for k, name in enumerate(kinds):
        images = in_group & (image_kinds == k)
        if images.any():
            texts = images[text_rows]
            i2t = i2t_hit[images].double().mean().item()
            t2i = t2i_hit[texts].double().mean().item()
            out[f"hard_r1_{name}"] = (i2t + t2i) / 2
    return out
