"""Callbacks that tests add to real runs through the command line (``+callbacks.<name>._target_=
run_probes.<Class>``, with ``tests/`` on PYTHONPATH): record what each rank trained on, inject faults."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import lightning as L
import torch


class RecordSteps(L.Callback):
    """One JSON line per optimizer step and rank in ``out_dir/rank<r>.jsonl``: the step, the sample ids
    of the batch, the loss and the stream epoch."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "step": trainer.global_step,
            "ids": batch["id"].tolist(),
            "loss": float(outputs["loss"]),
            "epoch": getattr(trainer.datamodule, "stream_epoch", None),
        }
        with open(self.out_dir / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def read_steps(out_dir: Path, rank: int) -> dict[int, dict]:
    lines = (Path(out_dir) / f"rank{rank}.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


class SignalAt(L.Callback):
    """Sends this process ``signal`` (Slurm's warning, SIGUSR1) when the step begins, on one rank."""

    def __init__(self, step: int, rank: int = 0, signum: int = int(signal.SIGUSR1)):
        self.step, self.rank, self.signum = step, rank, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), self.signum)


class NaNAt(L.Callback):
    """A NaN pixel in one rank's batch at the given steps (a corrupt input: the loss turns NaN)."""

    def __init__(self, step: int | list[int], rank: int = 0):
        self.steps = {step} if isinstance(step, int) else set(step)
        self.rank = rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step in self.steps and trainer.global_rank == self.rank:
            batch["image"][0, 0, 0, 0] = torch.nan


class SnapshotAround(L.Callback):
    """Saves the module's state dict (weights and buffers) and the optimizer's state before and after one
    step: ``out_dir/before.pt``, ``out_dir/after.pt``."""

    def __init__(self, step: int, out_dir: str):
        self.step, self.out_dir = step, Path(out_dir)

    def _save(self, trainer, pl_module, name: str) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "module": {k: v.clone() for k, v in pl_module.state_dict().items()},
            "optimizer": trainer.optimizers[0].state_dict()["state"],
        }
        torch.save(state, self.out_dir / f"{name}.pt")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self._save(trainer, pl_module, "before")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step + 1:
            self._save(trainer, pl_module, "after")


class Pids(L.Callback):
    """``out_dir/rank<r>.json``: this rank's pid and its step, rewritten after each step (renamed into place,
    so a reader never sees half of it): how a test finds a rank to kill once training is under way."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{trainer.global_rank}.json"
        path.with_suffix(".partial").write_text(json.dumps({"pid": os.getpid(), "step": trainer.global_step}))
        os.replace(path.with_suffix(".partial"), path)
