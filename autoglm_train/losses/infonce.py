"""Symmetric InfoNCE (CLIP) with local-vs-global logits.

Each rank scores its own B embeddings against the N = world*B embeddings gathered from every rank, so the
logits are B x N (memory linear in the world size) and the positives sit at ``offset + i``, where
``offset = rank * B``. With gradients flowing through the gather, the DDP-averaged gradient equals that of
one process computing the loss over the whole global batch.
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
) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies of the local rows."""
    labels = torch.arange(image_local.shape[0], device=image_local.device) + offset
    logits_i2t = logit_scale * image_local @ text_all.T
    logits_t2i = logit_scale * text_local @ image_all.T
    # cross-entropy in at least fp32 even under bf16 autocast: log-softmax over thousands of logits needs it
    wide = torch.promote_types(logits_i2t.dtype, torch.float32)
    return (F.cross_entropy(logits_i2t.to(wide), labels) + F.cross_entropy(logits_t2i.to(wide), labels)) / 2


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
) -> torch.Tensor:
    """InfoNCE of online queries against momentum keys (this step's gathered momentum batch + a queue).

    Every key with the query's sample id is a positive (targets spread evenly over them), so another
    caption of the same image, or the same image queued an epoch ago, is never a negative. With
    ``distill_alpha`` > 0 the targets mix in the momentum model's own similarity distribution (ALBEF).
    """
    wide = torch.promote_types(image.dtype, torch.float32)
    positives = (ids[:, None] == key_ids[None, :]).to(wide)
    hard = positives / positives.sum(1, keepdim=True)

    def direction(query, keys, query_m):
        logits = (logit_scale * query @ keys.T).to(wide)
        targets = hard
        if distill_alpha and query_m is not None:
            with torch.no_grad():
                soft = F.softmax((logit_scale * query_m @ keys.T).to(wide), dim=1)
            targets = distill_alpha * soft + (1 - distill_alpha) * hard
        return -(F.log_softmax(logits, dim=1) * targets).sum(1).mean()

    return (direction(image, text_keys, image_m) + direction(text, image_keys, text_m)) / 2


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
            )
        return infonce_loss(
            batch.image, batch.text, batch.image_all, batch.text_all, batch.logit_scale, batch.offset
        )
