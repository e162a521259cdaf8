"""SigLIP: a sigmoid loss on every (image, caption) pair, with a learnable logit bias.

logits = scale * <image, text> + bias; label +1 for a matching pair (same sample id; the diagonal when ids
are not given), -1 otherwise; loss = -sum(log sigmoid(label * logit)) / (number of images).
Across ranks each rank scores its local images against the captions of every rank, so every pair of the
global batch is counted exactly once, and DDP's average of the rank losses is the global loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def siglip_loss(
    image_local: torch.Tensor,
    text_all: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    offset: int = 0,
    ids: torch.Tensor | None = None,
    ids_all: torch.Tensor | None = None,
) -> torch.Tensor:
    wide = torch.promote_types(image_local.dtype, torch.float32)
    logits = (logit_scale * image_local @ text_all.T).to(wide) + logit_bias
    if ids is not None and ids_all is not None:
        positive = ids[:, None] == ids_all[None, :]
    else:
        positive = torch.zeros_like(logits, dtype=torch.bool)
        rows = torch.arange(image_local.shape[0], device=logits.device)
        positive[rows, rows + offset] = True
    labels = positive.to(logits.dtype) * 2 - 1
    return -F.logsigmoid(labels * logits).sum() / image_local.shape[0]


class SigLIP(nn.Module):
    """Term module; the scale is the model's logit scale, the bias is learned here (init -10 as in SigLIP)."""

    uses_queue = False  # scores the in-batch pairs only; momentum keys and queues do not apply

    def __init__(self, init_bias: float = -10.0, learn_bias: bool = True):
        super().__init__()
        # shape (1,): PowerSGD's DDP hook cannot take 0-dim gradients
        self.logit_bias = nn.Parameter(torch.tensor([float(init_bias)]), requires_grad=learn_bias)

    def forward(self, batch) -> torch.Tensor:
        batch.scheduled["siglip_bias"] = float(self.logit_bias.detach()[0])
        return siglip_loss(
            batch.image,
            batch.text_all,
            batch.logit_scale,
            self.logit_bias[0],
            batch.offset,
            batch.ids,
            batch.ids_all,
        )
