"""Callbacks that report on the run."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.utilities.model_summary.model_summary import (
    get_formatted_model_size,
    get_human_readable_count,
)


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


class ModelSummary(RichModelSummary):
    """Lightning's rich model summary without its FLOPs column and total: they read 0 unless the module
    defines ``example_input_array`` (ours does not: a forward on rank 0 alone would hang a sharded model)."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        from rich import get_console
        from rich.table import Table

        if total_flops:
            RichModelSummary.summarize(
                summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                total_flops, **summarize_kwargs,
            )  # fmt: skip
            return
        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            table.add_column(name, justify="right" if name.startswith("Params") else "left")
        for row in zip(*(values for _, values in columns), strict=True):
            table.add_row(*row)
        grid = Table.grid(expand=True)
        for label, value in [
            ("Trainable params", get_human_readable_count(int(trainable_parameters))),
            ("Non-trainable params", get_human_readable_count(int(total_parameters - trainable_parameters))),
            ("Total params", get_human_readable_count(int(total_parameters))),
            ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
        ]:
            grid.add_row(f"[bold]{label}[/]: {value}")
        console = get_console()
        console.print(table)
        console.print(grid)
