"""The configured loss terms, weighted and summed into one callable: embeddings in, losses out."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from autoglm_train.losses.schedules import Schedule

# gather(x) -> (x gathered from every rank in rank order, this rank's offset into it)
Gather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


def no_gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    return x, 0


@dataclass
class ContrastiveBatch:
    """What every loss term sees: local embeddings, their global counterparts, the logit scale, the step.

    Terms write the hyperparameter values they used this step into ``scheduled`` (logged as
    ``train/sched/<name>``); ``global_count(count) -> (sum over ranks, world size)`` lets a term average
    over items of every rank.
    """

    image: torch.Tensor
    text: torch.Tensor
    image_all: torch.Tensor
    text_all: torch.Tensor
    logit_scale: torch.Tensor
    offset: int
    ids: torch.Tensor | None = None
    ids_all: torch.Tensor | None = None
    step: int = 0
    global_count: Callable | None = None
    scheduled: dict[str, float] = field(default_factory=dict)


class Objective(nn.Module):
    """``forward(image_emb, text_emb, logit_scale, ids, step)`` ->
    ``{"loss": total, "loss/<term>": value, ..., "sched/<name>": value, ...}``.

    ``temperature`` (a Schedule) replaces the model's learned logit scale by 1/temperature(step).
    """

    def __init__(
        self,
        terms: Mapping[str, nn.Module],
        weights: Mapping[str, float] | None = None,
        temperature: Schedule | None = None,
        gather: Gather = no_gather,
    ):
        super().__init__()
        # a term or weight set to null in the config is dropped (how one loss config derives from another)
        terms = {name: term for name, term in terms.items() if term is not None}
        weights = {name: w for name, w in (weights or {}).items() if w is not None}
        if not terms:
            raise ValueError("loss.objective.terms is empty: configure at least one loss term")
        unknown = set(weights) - set(terms)
        if unknown:
            raise ValueError(f"loss weights name unknown terms {sorted(unknown)}; terms are {sorted(terms)}")
        self.terms = nn.ModuleDict(dict(terms))
        self.weights = {name: float(weights.get(name, 1.0)) for name in terms}
        self.temperature = temperature
        self.gather = gather

    def _global_count(self, count: torch.Tensor, world: int):
        counts, _ = self.gather(count.detach().float().reshape(1))
        return counts.sum(), world

    def forward(self, image, text, logit_scale, ids=None, step: int = 0) -> dict[str, torch.Tensor]:
        image_all, offset = self.gather(image)
        text_all, _ = self.gather(text)
        ids_all = self.gather(ids)[0] if ids is not None else None
        world = image_all.shape[0] // max(image.shape[0], 1)
        scheduled: dict[str, float] = {}
        if self.temperature is not None:
            scheduled["temperature"] = self.temperature(step)
            logit_scale = torch.tensor(1.0 / scheduled["temperature"], device=image.device)
        batch = ContrastiveBatch(
            image, text, image_all, text_all, logit_scale, offset, ids, ids_all, step,
            global_count=lambda count: self._global_count(count, world), scheduled=scheduled,
        )
        out = {f"loss/{name}": term(batch) for name, term in self.terms.items()}
        out["loss"] = sum(self.weights[name] * out[f"loss/{name}"] for name in self.terms)
        out.update({f"sched/{k}": torch.tensor(float(v)) for k, v in batch.scheduled.items()})
        return out
