"""The configured loss terms, weighted and summed into one callable: embeddings in, losses out."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

# gather(x) -> (x gathered from every rank in rank order, this rank's offset into it)
Gather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


def no_gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    return x, 0


@dataclass
class ContrastiveBatch:
    """What every loss term sees: local embeddings, their global counterparts, and the logit scale."""

    image: torch.Tensor
    text: torch.Tensor
    image_all: torch.Tensor
    text_all: torch.Tensor
    logit_scale: torch.Tensor
    offset: int
    ids: torch.Tensor | None = None
    ids_all: torch.Tensor | None = None


class Objective(nn.Module):
    """``forward(image_emb, text_emb, logit_scale, ids) -> {"loss": total, "loss/<term>": value, ...}``."""

    def __init__(self, terms: Mapping[str, nn.Module], weights: Mapping[str, float] | None = None, gather: Gather = no_gather):
        super().__init__()
        if not terms:
            raise ValueError("loss.objective.terms is empty: configure at least one loss term")
        weights = dict(weights or {})
        unknown = set(weights) - set(terms)
        if unknown:
            raise ValueError(f"loss weights name unknown terms {sorted(unknown)}; terms are {sorted(terms)}")
        self.terms = nn.ModuleDict(dict(terms))
        self.weights = {name: float(weights.get(name, 1.0)) for name in terms}
        self.gather = gather

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, ids: torch.Tensor | None = None):
        image_all, offset = self.gather(image)
        text_all, _ = self.gather(text)
        ids_all = self.gather(ids)[0] if ids is not None else None
        batch = ContrastiveBatch(image, text, image_all, text_all, logit_scale, offset, ids, ids_all)
        out = {f"loss/{name}": term(batch) for name, term in self.terms.items()}
        out["loss"] = sum(self.weights[name] * out[f"loss/{name}"] for name in self.terms)
        return out
