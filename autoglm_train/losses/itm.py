"""Image-text matching (ALBEF/BLIP): the fusion stage classifies (image, caption) pairs as matching or not.

Each rank scores its B true pairs, and for each of its images one caption, for each of its captions one
image, drawn from every rank's batch with probability given by the contrastive similarity (a softmax over
the global batch, pairs of the same sample id left out: another caption of the same image is no
negative). Similar-looking wrong pairs are drawn most, which is what teaches the fusion stage to read
binding ("a red circle and a blue square" against its swap) instead of bags of words.

The draw is made over the whole global batch from a generator seeded by (seed, step), identical on every
rank, and each rank keeps its own rows, so N ranks draw the same negatives as one process holding the
global batch. Negatives of another rank bring their token states through the gather, so their gradient
goes back to the rank that owns them.

With caption hard negatives on (``loss.text_negatives``), each image is also classified against its own
caption's generated negatives (same words, another meaning), the pairs a bag of words cannot tell apart.
The loss is the mean over every rank's pairs (a sum over the global pair count), so N ranks still equal
one process when ranks hold different numbers of valid negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autoglm_train.data.shards import stable_seed


def sample_itm_negatives(
    sims: torch.Tensor, ids: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(caption for each image, image for each caption)``: indices drawn from ``softmax(sims)`` along
    each row (``sims`` [N, N] image x caption, scaled) and column, same-``ids`` pairs excluded."""
    same = ids[:, None] == ids[None, :]
    lonely = same.all(dim=1)
    if lonely.any():
        raise ValueError(
            f"ITM negatives: {int(lonely.sum())} image(s) share their sample id with the whole global batch, "
            "so no caption can be their negative; use a larger batch"
        )
    wide = sims.float()
    image_to_text = F.softmax(wide.masked_fill(same, float("-inf")), dim=1)
    text_to_image = F.softmax(wide.T.masked_fill(same, float("-inf")), dim=1)
    captions = torch.multinomial(image_to_text, 1, generator=generator).squeeze(1)
    images = torch.multinomial(text_to_image, 1, generator=generator).squeeze(1)
    return captions, images


def pad_tokens(states: torch.Tensor, padding: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token states [B, L, W] and their padding mask right-padded to ``length`` (ranks may trim to different
    lengths, and gathering needs one shape)."""
    extra = length - states.shape[1]
    if extra <= 0:
        return states, padding
    return F.pad(states, (0, 0, 0, extra)), F.pad(padding, (0, extra), value=True)


class ITMLoss(nn.Module):
    """The ``itm`` term: cross-entropy of the fusion stage's 2-way head over B positive pairs and 2B drawn
    negatives per rank. Added to the objective when the model has a fusion stage (``model.fusion.layers``);
    ``loss.weights.itm`` weighs it."""

    uses_queue = False

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = seed
        self.drawn: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, batch) -> torch.Tensor:
        if batch.fusion is None:
            raise ValueError("the itm loss term needs a model with a fusion stage (model.fusion.layers > 0)")
        itm_logits, states = batch.fusion[:2]
        captions_negatives = batch.fusion[2] if len(batch.fusion) > 2 else None
        b, offset = batch.image.shape[0], batch.offset
        ids = batch.ids_all
        if ids is None:
            ids = torch.arange(batch.image_all.shape[0], device=batch.image.device)
        with torch.no_grad():
            sims = batch.logit_scale.detach() * batch.image_all.detach() @ batch.text_all.detach().T
            generator = torch.Generator(device=sims.device).manual_seed(
                stable_seed(self.seed, batch.step, "itm")
            )
            captions, images = sample_itm_negatives(sims, ids, generator)
        captions, images = captions[offset : offset + b], images[offset : offset + b]
        self.drawn = (captions, images)  # global rows of this step's negatives (for inspection and tests)
        # every rank's token states, for the negatives drawn from other ranks
        longest = int(batch.gather(torch.tensor([states.text.shape[1]], device=sims.device))[0].max())
        text, padding = pad_tokens(states.text, states.text_padding, longest)
        text_all, padding_all = batch.gather(text)[0], batch.gather(padding.to(torch.uint8))[0].bool()
        image_all = batch.gather(states.image)[0]
        image_side = [states.image, states.image, image_all[images]]
        text_side, padding_side = [text, text_all[captions], text], [padding, padding_all[captions], padding]
        if captions_negatives is not None:  # each image against its own caption's generated negatives
            neg_states, neg_padding, valid = captions_negatives
            keep = valid.bool()
            image_side.append(states.image.repeat_interleave(neg_states.shape[0] // b, dim=0)[keep])
            text_side.append(neg_states[keep])
            padding_side.append(neg_padding[keep])
        length = max(t.shape[1] for t in text_side)  # the negatives were trimmed on their own
        padded = [pad_tokens(t, p, length) for t, p in zip(text_side, padding_side, strict=True)]
        logits = itm_logits(torch.cat(image_side), *(torch.cat(part) for part in zip(*padded, strict=True)))
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        labels[:b] = 1
        total = F.cross_entropy(logits.float(), labels, reduction="sum")
        pairs, world = batch.global_count(torch.tensor(float(logits.shape[0]), device=logits.device))
        return total * world / pairs
