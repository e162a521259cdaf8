"""Projection heads of a trained model factorized by truncated SVD (``W ~ U V``), at a fixed rank or at the
smallest rank keeping a share of each head's squared singular values (its energy)."""

from __future__ import annotations

from torch import nn

from autoglm_train.model.dual_encoder import LowRankLinear, energy_rank


def factorize_heads(model, rank: int | None = None, energy: float | None = None) -> dict[str, int]:
    """Replace each linear head (``image_proj``, ``text_proj``) by its truncated SVD, in place; returns the
    rank each head got. A head that is not a plain bias-free ``nn.Linear`` is an error naming it."""
    if (rank is None) == (energy is None):
        raise ValueError("lowrank_heads: give rank or energy, not both")
    ranks = {}
    for name in ("image_proj", "text_proj"):
        head = getattr(model, name)
        if not isinstance(head, nn.Linear) or head.bias is not None:
            kind = type(head).__name__
            raise ValueError(f"lowrank_heads: {name} is a {kind}, not a bias-free nn.Linear head")
        out_features, in_features = head.weight.shape
        r = rank if rank is not None else energy_rank(head.weight.detach(), energy)
        r = min(r, in_features, out_features)
        low = LowRankLinear(in_features, out_features, r).to(head.weight.device)
        low.factorize_(head.weight.detach())
        setattr(model, name, low)
        ranks[name] = r
    return ranks
