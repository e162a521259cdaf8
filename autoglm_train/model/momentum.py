"""Momentum (EMA) copy of the dual encoder, never trained by gradient (timm's ModelEmaV3 does the update).

The coefficient m is constant or follows MoCo v3's cosine rise to 1:
m(step) = 1 - (1 - m0) * (1 + cos(pi * step / total_steps)) / 2.
"""

from __future__ import annotations

import math

import torch
from timm.utils import ModelEmaV3
from torch import nn

MOMENTUM_SCHEDULES = ("constant", "cosine")


def momentum_at(step: int, base: float, schedule: str, total_steps: int) -> float:
    if schedule not in MOMENTUM_SCHEDULES:
        raise ValueError(f"momentum.schedule must be one of {MOMENTUM_SCHEDULES}, got {schedule!r}")
    if schedule == "constant" or total_steps <= 0:
        return base
    if schedule == "cosine":
        progress = min(1.0, step / total_steps)
        return 1 - (1 - base) * (1 + math.cos(math.pi * progress)) / 2
    raise ValueError(f"momentum.schedule must be one of {MOMENTUM_SCHEDULES}, got {schedule!r}")


class MomentumEncoder(ModelEmaV3):
    """``update(online, step)`` after each optimizer step: p_m <- m * p_m + (1 - m) * p_online
    (buffers such as batch-norm statistics follow the same average)."""

    def __init__(
        self, model: nn.Module, momentum: float = 0.995, schedule: str = "constant", total_steps: int = 0
    ):
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum.m must be in [0, 1], got {momentum}")
        momentum_at(0, momentum, schedule, total_steps)  # validates the schedule name
        super().__init__(model, decay=momentum)
        self.module.requires_grad_(False)
        self.schedule, self.total_steps = schedule, total_steps

    @torch.no_grad()
    def apply_update_(self, model: nn.Module, decay: float) -> None:
        # per shard: sharded (FSDP) weights are DTensors laid out alike in both models, and each rank
        # averages its own shards; buffers (batch-norm statistics) are plain tensors on every rank
        ema, online = [], []
        pairs = zip(self.module.state_dict().values(), model.state_dict().values(), strict=True)
        for ema_v, model_v in pairs:
            ema_v, model_v = _local(ema_v), _local(model_v)
            if ema_v.is_floating_point():
                ema.append(ema_v)
                online.append(model_v)
            else:
                ema_v.copy_(model_v)
        self._foreach_lerp_(ema, online, weight=1.0 - decay)

    def get_decay(self, step: int | None = None) -> float:
        return self.decay if step is None else momentum_at(step, self.decay, self.schedule, self.total_steps)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.module.encode_image(images), self.module.encode_text(tokens)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard on this rank
