"""Symmetric InfoNCE (CLIP) with local-vs-global logits.

Each rank scores its own B embeddings against the N = world*B embeddings gathered from every rank, so the
logits are B x N (memory linear in the world size) and the positives sit at ``offset + i``, where
``offset = rank * B``. With gradients flowing through the gather, the DDP-averaged gradient equals that of
one process computing the loss over the whole global batch.

Caption hard negatives (``loss.text_negatives``, NegCLIP): embeddings of generated captions gathered like
the captions and appended as extra columns of the image->text logits only; a caption is never a negative
of text->image, and an invalid slot (a caption without a negative) is masked out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def infonce_loss(
    image_local: torch.Tensor,
    text_local: torch.Tensor,
    image_all: torch.Tensor,
    text_all: torch.Tensor,
    logit_scale: torch.Tensor,
    offset: int = 0,
    text_neg_all: torch.Tensor | None = None,
    text_neg_valid_all: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies of the local rows; ``text_neg_all``: extra
    image->text columns (``text_neg_valid_all`` masks the invalid ones)."""
    labels = torch.arange(image_local.shape[0], device=image_local.device) + offset
    logits_i2t = with_negatives(
        logit_scale * image_local @ text_all.T, image_local, text_neg_all, text_neg_valid_all, logit_scale
    )
    logits_t2i = logit_scale * text_local @ image_all.T
    # cross-entropy in at least fp32 even under bf16 autocast: log-softmax over thousands of logits needs it
    wide = torch.promote_types(logits_i2t.dtype, torch.float32)
    return (F.cross_entropy(logits_i2t.to(wide), labels) + F.cross_entropy(logits_t2i.to(wide), labels)) / 2


def with_negatives(
    logits: torch.Tensor,
    queries: torch.Tensor,
    negatives: torch.Tensor | None,
    valid: torch.Tensor | None,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """``logits`` with the queries' scores against ``negatives`` appended as columns, the invalid at
    -inf (they take no probability and pass no gradient)."""
    if negatives is None:
        return logits
    extra = logit_scale * queries @ negatives.T
    if valid is not None:
        extra = extra.masked_fill(~valid.bool()[None, :], float("-inf"))
    return torch.cat([logits, extra.to(logits.dtype)], dim=1)


def keyed_infonce_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    image_keys: torch.Tensor,
    text_keys: torch.Tensor,
    ids: torch.Tensor,
    key_ids: torch.Tensor,
    logit_scale: torch.Tensor,
    image_m: torch.Tensor | None = None,
    text_m: torch.Tensor | None = None,
    distill_alpha: float = 0.0,
    text_neg_keys: torch.Tensor | None = None,
    text_neg_valid_all: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE of online queries against momentum keys (this step's gathered momentum batch + a queue).

    Every key with the query's sample id is a positive (targets spread evenly over them), so another
    caption of the same image, or the same image queued an epoch ago, is never a negative. With
    ``distill_alpha`` > 0 the targets mix in the momentum model's own similarity distribution (ALBEF).
    ``text_neg_keys``: the momentum model's embeddings of caption negatives, extra image->text keys.
    """
    wide = torch.promote_types(image.dtype, torch.float32)
    positives = (ids[:, None] == key_ids[None, :]).to(wide)
    hard = positives / positives.sum(1, keepdim=True)

    def direction(query, keys, query_m, negatives=None):
        logits = with_negatives(
            (logit_scale * query @ keys.T).to(wide), query, negatives, text_neg_valid_all, logit_scale
        )
        targets = F.pad(hard, (0, logits.shape[1] - hard.shape[1]))  # a negative is never a target
        if distill_alpha and query_m is not None:
            with torch.no_grad():
                soft_logits = (logit_scale * query_m @ keys.T).to(wide)
                soft = F.softmax(
                    with_negatives(soft_logits, query_m, negatives, text_neg_valid_all, logit_scale), dim=1
                )
            targets = distill_alpha * soft + (1 - distill_alpha) * targets
        # masked columns: -inf log-probability times a zero target, which would read as NaN
        log_probs = F.log_softmax(logits, dim=1).masked_fill(targets == 0, 0.0)
        return -(log_probs * targets).sum(1).mean()

    return (direction(image, text_keys, image_m, text_neg_keys) + direction(text, image_keys, text_m)) / 2


class InfoNCE(nn.Module):
    def forward(self, batch) -> torch.Tensor:
        if batch.text_keys is not None:
            return keyed_infonce_loss(
                batch.image,
                batch.text,
                batch.image_keys,
                batch.text_keys,
                batch.ids,
                batch.key_ids,
                batch.logit_scale,
                batch.image_m,
                batch.text_m,
                batch.distill_alpha,
                batch.text_neg_keys,
                batch.text_neg_valid_all,
            )
        return infonce_loss(
            batch.image,
            batch.text,
            batch.image_all,
            batch.text_all,
            batch.logit_scale,
            batch.offset,
            batch.text_neg_all,
            batch.text_neg_valid_all,
        )
