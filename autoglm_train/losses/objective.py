"""The configured loss terms, weighted and summed into one callable: embeddings in, losses out."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from autoglm_train.losses.queue import FeatureQueue
from autoglm_train.losses.schedules import Schedule

log = logging.getLogger(__name__)

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
    # with a momentum encoder: the keys are the gathered momentum embeddings of this step followed by the
    # queue (no gradient), ``key_ids`` their sample ids; ``image_m``/``text_m`` the local momentum embeddings
    image_keys: torch.Tensor | None = None
    text_keys: torch.Tensor | None = None
    key_ids: torch.Tensor | None = None
    image_m: torch.Tensor | None = None
    text_m: torch.Tensor | None = None
    # queued momentum embeddings alone (extra negatives for the triplet term)
    image_queue: torch.Tensor | None = None
    text_queue: torch.Tensor | None = None
    queue_ids: torch.Tensor | None = None
    distill_alpha: float = 0.0
    # caption hard negatives (loss.text_negatives): gathered embeddings, which slots hold one, and with a
    # momentum encoder its embeddings of them (gathered); only image->text InfoNCE scores them
    text_neg_all: torch.Tensor | None = None
    text_neg_valid_all: torch.Tensor | None = None
    text_neg_keys: torch.Tensor | None = None
    # the fusion stage: (itm_logits(image_tokens, text_states, text_padding), TokenStates of this rank's
    # batch), and the gather that brings other ranks' rows (the itm term draws negatives from them)
    fusion: tuple | None = None
    gather: Callable | None = None


class Objective(nn.Module):
    """``forward(image_emb, text_emb, logit_scale, ids, step, momentum, text_neg, text_neg_valid)`` ->
    ``{"loss": total, "loss/<term>": value, ..., "sched/<name>": value, ...}``.

    ``temperature`` (a Schedule) replaces the model's learned logit scale by 1/temperature(step), clamped
    at ``max_logit_scale`` like the learned one (the temperature used, logged, is then 1/max_logit_scale).
    ``momentum=(image_m, text_m)`` (a momentum encoder's embeddings of the batch) turns on keys: terms score
    against the gathered momentum batch plus queues of ``queue_size`` past keys, which are updated after the
    loss. ``distill_alpha`` (ramped up linearly over ``distill_ramp_steps``) mixes the momentum model's
    similarity distribution into the InfoNCE targets (ALBEF's momentum distillation). ``text_neg``: the
    embeddings of generated caption negatives (``text_neg_valid``: which slots hold one), gathered from
    every rank for the InfoNCE term's image->text direction; with momentum, ``momentum`` carries the
    momentum encoder's embeddings of them third. ``fusion``: ``(itm_logits, TokenStates)`` for the itm term
    (losses/itm.py), with a model that has a fusion stage.
    """

    def __init__(
        self,
        terms: Mapping[str, nn.Module],
        weights: Mapping[str, float] | None = None,
        temperature: Schedule | None = None,
        max_logit_scale: float = 100.0,
        queue_size: int = 0,
        distill_alpha: float = 0.0,
        distill_ramp_steps: int = 0,
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
        if not max_logit_scale > 0:
            raise ValueError(f"max_logit_scale must be > 0, got {max_logit_scale}")
        # the learned scale cannot pass max_logit_scale (model/dual_encoder.py); a schedule must not either,
        # or a temperature scheduled towards 0 makes the logits, and the loss, blow up
        self.min_temperature = 1.0 / max_logit_scale
        if queue_size < 0 or not 0.0 <= distill_alpha <= 1.0:
            raise ValueError("loss.queue_size must be >= 0 and loss.distill_alpha in [0, 1]")
        self.queue_size, self.distill_alpha, self.distill_ramp_steps = (
            queue_size,
            distill_alpha,
            distill_ramp_steps,
        )
        ignoring = [name for name, term in self.terms.items() if not getattr(term, "uses_queue", True)]
        if queue_size and len(ignoring) == len(self.terms):
            raise ValueError(
                f"loss.queue_size={queue_size} but no term uses a queue ({ignoring} score in-batch pairs "
                "only): set loss.queue_size=0, or add an infonce or triplet term"
            )
        if queue_size and ignoring:
            log.warning("loss terms %s ignore the queue; the other terms use it", ignoring)
        self.queues: dict[str, FeatureQueue] = {}  # made on first use, when the embedding size is known
        self.gather = gather

    def scheduled_temperature(self, step: int) -> float:
        """The schedule's temperature at ``step``, never below 1/max_logit_scale: the value actually used."""
        return max(self.temperature(step), self.min_temperature)

    def _global_count(self, count: torch.Tensor, world: int):
        counts, _ = self.gather(count.detach().float().reshape(1))
        return counts.sum(), world

    def forward(
        self,
        image,
        text,
        logit_scale,
        ids=None,
        step: int = 0,
        momentum=None,
        text_neg=None,
        text_neg_valid=None,
        fusion=None,
    ) -> dict[str, torch.Tensor]:
        image_all, offset = self.gather(image)
        text_all, _ = self.gather(text)
        ids_all = self.gather(ids)[0] if ids is not None else None
        world = image_all.shape[0] // max(image.shape[0], 1)
        scheduled: dict[str, float] = {}
        if self.temperature is not None:
            scheduled["temperature"] = self.scheduled_temperature(step)
            logit_scale = torch.tensor(1.0 / scheduled["temperature"], device=image.device)
        batch = ContrastiveBatch(
            image,
            text,
            image_all,
            text_all,
            logit_scale,
            offset,
            ids,
            ids_all,
            step,
            global_count=lambda count: self._global_count(count, world),
            scheduled=scheduled,
            fusion=fusion,
            gather=self.gather,
        )
        if text_neg is not None:
            batch.text_neg_all = self.gather(text_neg)[0]
            if text_neg_valid is not None:
                batch.text_neg_valid_all = self.gather(text_neg_valid.to(torch.uint8))[0].bool()
        keys = self._attach_keys(batch, momentum, step) if momentum is not None else None
        out = {f"loss/{name}": term(batch) for name, term in self.terms.items()}
        out["loss"] = sum(self.weights[name] * out[f"loss/{name}"] for name in self.terms)
        # a non-finite key (a corrupt input) would poison every later step's negatives; the step itself
        # is then non-finite and stopped or skipped (lit/divergence.py), the queue left as it was
        if keys is not None and self.queue_size and all(torch.isfinite(k).all() for k in keys):
            for name, key in zip(("image", "text"), keys, strict=True):
                self.queues[name].enqueue(key, batch.ids_all)
        out.update({f"sched/{k}": torch.tensor(float(v)) for k, v in batch.scheduled.items()})
        return out

    def _attach_keys(self, batch: ContrastiveBatch, momentum, step: int):
        if batch.ids is None:
            raise ValueError("momentum keys need sample ids in the batch (batch['id'])")
        image_m, text_m = momentum[0].detach(), momentum[1].detach()
        with torch.no_grad():
            image_m_all, text_m_all = self.gather(image_m)[0], self.gather(text_m)[0]
            if len(momentum) > 2 and momentum[2] is not None:  # the momentum model's caption negatives
                batch.text_neg_keys = self.gather(momentum[2].detach())[0]
        batch.image_m, batch.text_m = image_m, text_m
        batch.image_keys, batch.text_keys, batch.key_ids = image_m_all, text_m_all, batch.ids_all
        if self.queue_size:
            for name in ("image", "text"):
                self.queues.setdefault(name, FeatureQueue(self.queue_size, image_m.shape[1]))
            (image_q, queue_ids), (text_q, _) = (
                self.queues["image"].contents(),
                self.queues["text"].contents(),
            )
            batch.image_queue, batch.text_queue, batch.queue_ids = image_q, text_q, queue_ids
            batch.image_keys = torch.cat([image_m_all, image_q.to(image_m_all.dtype)])
            batch.text_keys = torch.cat([text_m_all, text_q.to(text_m_all.dtype)])
            batch.key_ids = torch.cat([batch.ids_all, queue_ids])
        if self.distill_alpha:
            ramp = min(1.0, step / self.distill_ramp_steps) if self.distill_ramp_steps else 1.0
            batch.distill_alpha = self.distill_alpha * ramp
            batch.scheduled["distill_alpha"] = batch.distill_alpha
        return image_m_all, text_m_all

    def queue_state(self) -> dict:
        return {name: q.state_dict() for name, q in self.queues.items()}

    def load_queue_state(self, state: dict) -> None:
        for name, q_state in state.items():
            dim = q_state["features"].shape[1]
            self.queues.setdefault(name, FeatureQueue(self.queue_size, dim)).load_state_dict(q_state)
