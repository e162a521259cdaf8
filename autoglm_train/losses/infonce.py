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


class InfoNCE(nn.Module):
    def forward(self, batch) -> torch.Tensor:
        return infonce_loss(batch.image, batch.text, batch.image_all, batch.text_all, batch.logit_scale, batch.offset)
