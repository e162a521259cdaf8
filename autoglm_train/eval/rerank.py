"""Re-ranking retrieval's top-k with the fusion stage (ALBEF/BLIP's second stage).

The dual encoder ranks the whole gallery by one dot product per pair; the fusion stage then scores each
query's top ``k`` (an image against k captions, a caption against k images) with its image-text matching
head, and those k are reordered by that score (``itm``: the match log-odds) or by it plus the dual
encoder's scaled similarity (``itm+itc``, BLIP's sum). Items past the k keep their order, so R@K for K > k
is the dual encoder's. Costs k fusion passes per query (the figures: docs/results.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from autoglm_train.model.fusion import itm_score

RERANK_SCORES = ("itm", "itm+itc")


@torch.no_grad()
def pair_scores(
    itm_logits: Callable,
    image_tokens: torch.Tensor,
    text_states: torch.Tensor,
    text_padding: torch.Tensor,
    image_rows: torch.Tensor,
    text_rows: torch.Tensor,
    batch_size: int = 1024,
) -> torch.Tensor:
    """ITM match scores of the pairs ``(image_rows[i], text_rows[i])``, in batches of pairs."""
    out = []
    for start in range(0, len(image_rows), batch_size):
        i, t = image_rows[start : start + batch_size], text_rows[start : start + batch_size]
        out.append(itm_score(itm_logits(image_tokens[i], text_states[t], text_padding[t])))
    return torch.cat(out) if out else torch.empty(0, device=image_tokens.device)


def _reranked_hits(sims, query_ids, gallery_ids, k, ks, score_pairs, score, logit_scale, chunk_size):
    """R@K of queries (rows of ``sims``) with each query's top-k reordered by ``score_pairs(query rows,
    gallery rows)``."""
    kmax = min(max(max(ks), k), sims.shape[1])
    hits = {K: 0 for K in ks}
    for start in range(0, sims.shape[0], chunk_size):
        block = sims[start : start + chunk_size]
        top_sims, top = block.topk(kmax, dim=1)
        kk = min(k, kmax)
        rows = torch.arange(start, start + block.shape[0], device=sims.device).repeat_interleave(kk)
        fused = score_pairs(rows, top[:, :kk].reshape(-1)).view(-1, kk)
        if score == "itm+itc":
            fused = fused + logit_scale * top_sims[:, :kk].float()
        order = fused.argsort(dim=1, descending=True, stable=True)
        top = torch.cat([top[:, :kk].gather(1, order), top[:, kk:]], dim=1)
        match = gallery_ids[top] == query_ids[start : start + block.shape[0], None]
        for K in ks:
            hits[K] += int(match[:, :K].any(dim=1).sum())
    return {K: hits[K] / sims.shape[0] for K in ks}


@torch.no_grad()
def rerank_metrics(
    image_emb: torch.Tensor,
    image_ids: torch.Tensor,
    text_emb: torch.Tensor,
    text_image_ids: torch.Tensor,
    itm_logits: Callable,
    image_tokens: torch.Tensor,
    text_states: torch.Tensor,
    text_padding: torch.Tensor,
    k: int,
    score: str = "itm",
    logit_scale: float = 1.0,
    ks: tuple[int, ...] = (1, 5, 10),
    chunk_size: int = 256,
) -> dict[str, float]:
    """``rerank_i2t_r{K}``, ``rerank_t2i_r{K}``, ``rerank_r1_mean``: retrieval_metrics' figures with each
    query's top ``k`` re-ranked by the fusion stage (``k`` >= the gallery: every pair scored)."""
    if score not in RERANK_SCORES:
        raise ValueError(f"eval.rerank.score must be one of {RERANK_SCORES}, got {score!r}")
    if k < 1:
        raise ValueError(f"eval.rerank.k must be >= 1 to re-rank, got {k}")
    sims = image_emb.float() @ text_emb.float().T

    def image_queries(q, g):
        return pair_scores(itm_logits, image_tokens, text_states, text_padding, q, g)

    def text_queries(q, g):
        return pair_scores(itm_logits, image_tokens, text_states, text_padding, g, q)

    i2t = _reranked_hits(
        sims, image_ids, text_image_ids, k, ks, image_queries, score, logit_scale, chunk_size
    )
    t2i = _reranked_hits(
        sims.T, text_image_ids, image_ids, k, ks, text_queries, score, logit_scale, chunk_size
    )
    out = {f"rerank_i2t_r{K}": v for K, v in i2t.items()} | {f"rerank_t2i_r{K}": v for K, v in t2i.items()}
    out["rerank_r1_mean"] = (out["rerank_i2t_r1"] + out["rerank_t2i_r1"]) / 2
    return out


@torch.no_grad()
def group_pair_scores(
    image_ids: torch.Tensor,
    text_image_ids: torch.Tensor,
    image_groups: torch.Tensor,
    image_kinds: torch.Tensor,
    score_pairs: Callable,
) -> torch.Tensor:
    """An [images, captions] score matrix holding the fusion stage's score of every pair within a hard
    group (``score_pairs(image rows, caption rows)``) and -inf elsewhere: group_recall's input for the
    re-ranked hard-group figures (a group is a handful of images, so every pair in it is scored)."""
    device = image_groups.device
    row_of = {int(i): r for r, i in enumerate(image_ids.tolist())}
    text_rows = torch.tensor([row_of[int(i)] for i in text_image_ids.tolist()], device=device)
    same = (image_groups[:, None] == image_groups[text_rows][None, :]) & (image_kinds >= 0)[:, None]
    images, texts = same.nonzero(as_tuple=True)
    out = torch.full(same.shape, float("-inf"), device=device)
    out[images, texts] = score_pairs(images, texts).float()
    return out
