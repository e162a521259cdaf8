"""Callbacks that report on the run."""

from __future__ import annotations

import time

import lightning as L


class TrainTimer(L.Callback):
    """Wall time of the fit, and of the training loop alone (validation excluded) for samples/s."""

    def __init__(self) -> None:
        self.fit_s = 0.0
        self.val_s = 0.0
        self._fit_start = self._val_start = 0.0

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fit_start = time.perf_counter()

    def on_fit_end(self, trainer, pl_module) -> None:
        self.fit_s = time.perf_counter() - self._fit_start

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit":
            self.val_s += time.perf_counter() - self._val_start

    @property
    def train_s(self) -> float:
        return max(self.fit_s - self.val_s, 1e-9)


class CommStats(L.Callback):
    """Bytes the DDP communication hook all-reduced in the last synchronizing backward, against the
    uncompressed size (``comm/*``); nothing without a compressing strategy."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # here, not in on_after_backward: the strategy counts the backward after that hook runs; and this
        # hook runs in manual optimization (gradient caching) too
        stats = getattr(trainer.strategy, "comm_stats", None)
        if stats:
            pl_module.log("comm/bytes", stats["bytes"])
            pl_module.log("comm/bytes_uncompressed", stats["uncompressed"])
            pl_module.log("comm/ratio", stats["bytes"] / stats["uncompressed"])
