"""Cross-modal triplet loss with a margin and online negative mining.

Anchors are the local rows of one modality, the positive is the paired item of the other modality, the
negatives are every other item of the other modality in the gathered global batch, except items that
share the anchor's sample id (another caption of the same image is not a negative). Both directions
(image anchors against captions, caption anchors against images) are averaged.

With cosine similarity s on unit vectors, the cosine distance is d = 1 - s, and the hinge of a triplet
(a, p, n) is max(0, margin + d(a, p) - d(a, n)) = max(0, margin - s(a, p) + s(a, n)).

Mining (which (anchor, negative) pairs count):
  - ``all``: every valid triplet that violates the margin (hinge > 0); mean over them.
  - ``semihard``: negatives farther than the positive but inside the margin band,
    d(a, p) < d(a, n) < d(a, p) + margin; mean over them.
  - ``hard``: per anchor, the hardest valid negative (VSE++ max violation); mean over anchors that
    have a valid negative.

The mean is over the triplets of all ranks: each rank divides its sum by the global count / world size,
so DDP's average of the rank losses is the global mean. No valid triplet gives 0 with a gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from autoglm_train.losses.schedules import Schedule, as_schedule

MINING_MODES = ("all", "semihard", "hard")


def valid_negatives(
    n_local: int, n_all: int, offset: int, ids=None, ids_all=None, device=None
) -> torch.Tensor:
    """(n_local, n_all) bool: column j may be a negative of local anchor i."""
    if ids is not None and ids_all is not None:
        return ids[:, None] != ids_all[None, :]
    valid = torch.ones(n_local, n_all, dtype=torch.bool, device=device)
    rows = torch.arange(n_local, device=device)
    valid[rows, rows + offset] = False
    return valid


def select_triplets(
    sim: torch.Tensor, positive_sim: torch.Tensor, valid: torch.Tensor, margin: float, mining: str
):
    """(anchors, columns) bool mask of the (anchor, negative) pairs the mining mode keeps.

    ``sim``: anchor-to-column similarities; ``positive_sim``: each anchor's similarity to its positive.
    """
    sim, positive_sim = sim.detach(), positive_sim.detach()[:, None]
    if mining == "all":
        return valid & (margin - positive_sim + sim > 0)
    if mining == "semihard":
        return valid & (sim < positive_sim) & (sim > positive_sim - margin)
    if mining == "hard":
        masked = sim.masked_fill(~valid, float("-inf"))
        hardest = masked.argmax(dim=1, keepdim=True)
        chosen = torch.zeros_like(valid).scatter_(1, hardest, True)
        return chosen & valid  # anchors without any valid negative keep nothing
    raise ValueError(f"loss.mining must be one of {MINING_MODES}, got {mining!r}")


def _direction(anchor, others_all, offset, margin, mining, valid):
    sim = anchor @ others_all.T
    rows = torch.arange(anchor.shape[0], device=anchor.device)
    positive_sim = sim[rows, rows + offset]
    chosen = select_triplets(sim, positive_sim, valid, margin, mining)
    hinge = (margin - positive_sim[:, None] + sim).clamp(min=0)
    # hinge * mask (not hinge[mask]) keeps the graph when nothing is chosen: the sum is 0 with a gradient
    return (hinge * chosen).sum(), chosen.sum()


def triplet_loss(
    image_local: torch.Tensor,
    text_local: torch.Tensor,
    image_all: torch.Tensor,
    text_all: torch.Tensor,
    margin: float,
    mining: str = "hard",
    offset: int = 0,
    ids: torch.Tensor | None = None,
    ids_all: torch.Tensor | None = None,
    global_count=None,
    image_extra: torch.Tensor | None = None,
    text_extra: torch.Tensor | None = None,
    extra_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean hinge over the chosen triplets of both directions.

    ``global_count(count) -> (total count over ranks, world size)``; omitted means one process.
    ``image_extra``/``text_extra`` (with ``extra_ids``) are more negatives, e.g. a queue of momentum keys.
    """
    if mining not in MINING_MODES:
        raise ValueError(f"loss.mining must be one of {MINING_MODES}, got {mining!r}")
    # similarities in at least fp32: under bf16 a margin of 0.1 is a few units in the last place
    wide = torch.promote_types(image_local.dtype, torch.float32)
    image_local, text_local, image_all, text_all = (
        x.to(wide) for x in (image_local, text_local, image_all, text_all)
    )
    if text_extra is not None:
        if ids is None or ids_all is None or extra_ids is None:
            raise ValueError("extra negatives need sample ids")
        image_all = torch.cat([image_all, image_extra.to(wide)])
        text_all = torch.cat([text_all, text_extra.to(wide)])
        ids_all = torch.cat([ids_all, extra_ids])
    valid = valid_negatives(
        image_local.shape[0], image_all.shape[0], offset, ids, ids_all, image_local.device
    )
    i2t_sum, i2t_n = _direction(image_local, text_all, offset, margin, mining, valid)
    t2i_sum, t2i_n = _direction(text_local, image_all, offset, margin, mining, valid)
    count = i2t_n + t2i_n
    total, world = global_count(count) if global_count is not None else (count, 1)
    return (i2t_sum + t2i_sum) * world / total.clamp(min=1)


class TripletLoss(nn.Module):
    """Term module: ``margin`` a number or a schedule (e.g. linear warm-up); logs the margin in use."""

    def __init__(self, margin: float | Schedule = 0.2, mining: str = "hard"):
        super().__init__()
        if mining not in MINING_MODES:
            raise ValueError(f"loss.mining must be one of {MINING_MODES}, got {mining!r}")
        self.margin = as_schedule(margin)
        self.mining = mining

    def forward(self, batch) -> torch.Tensor:
        margin = self.margin(batch.step)
        batch.scheduled["margin"] = margin
        return triplet_loss(
            batch.image,
            batch.text,
            batch.image_all,
            batch.text_all,
            margin,
            self.mining,
            batch.offset,
            batch.ids,
            batch.ids_all,
            global_count=batch.global_count,
            image_extra=batch.image_queue,
            text_extra=batch.text_queue,
            extra_ids=batch.queue_ids,
        )
