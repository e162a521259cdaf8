"""What a checkpoint must hold, beyond what Lightning saves, for a resumed run to continue exactly like one
never stopped, on every rank. One owner, one checkpoint key (``checkpoint["run_state"]``):

- ``ranks``: per rank, where its training stream stands (epoch, batches trained in it) and the global
  random states (CPU, and CUDA when used: dropout and the like). Ranks read different shards
  (``split_by_node``), so each has its own position; all are gathered into rank 0's checkpoint.
- ``queues``: the negative queues (identical on every rank: every rank enqueues the gathered keys).
- ``skipped``: samples skipped as unusable, by reason, summed over ranks.
- ``tokenizer_json``: the tokenizer (it sizes the text tower), so a checkpoint is usable alone.
- ``config``: the run's composed config (as written, interpolations kept), against which a resume checks
  its own (``resume_config.py``) and whose digest the checkpoint's manifest carries.

Lightning saves the rest: weights (with the momentum encoder's), optimizer and LR scheduler states, loop
counters, and callbacks' own ``state_dict`` (``DivergenceGuard``: steps skipped so far).

Saving gathers from every rank, so every save must be reached by all ranks at the same step: Lightning's
checkpoint callbacks and ``trainer.save_checkpoint`` after fit are; the preemption checkpoint is made so
(``lit/preemption.py``).
"""

from __future__ import annotations

import logging
import random
from collections import Counter

import lightning as L
import torch

from autoglm_train.distributed.gather import gather_objects, rank_and_world, sum_counts

log = logging.getLogger(__name__)


def random_states() -> dict:
    states = {"torch": torch.get_rng_state(), "random": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_random_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["random"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


class RunState(L.Callback):
    def __init__(self, config: dict | None = None) -> None:
        self.config = config  # the run's composed config, saved with every checkpoint
        self.epoch = 0  # the training stream's epoch of the batch being trained, on this rank
        self.batches = 0  # batches trained in that epoch, on this rank
        self.skipped: Counter[str] = Counter()  # this rank's skips (rank 0 also carries a resumed total)
        self._random: dict | None = None  # this rank's saved random states, until training starts

    # --- counting ---------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # the stream's own epoch, not Lightning's: with shards split over ranks, epochs end at other steps
        # on other ranks, and a rank's stream is ahead of the loop by the batch Lightning prefetches only
        # within an epoch, never across its end
        epoch = getattr(trainer.datamodule, "stream_epoch", 0)
        if epoch != self.epoch:
            self.epoch, self.batches = epoch, 0
        self.batches += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._count_skipped(pl_module, batch)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._count_skipped(pl_module, batch)

    def _count_skipped(self, pl_module, batch: dict) -> None:
        # the counts ride with the batches: loader workers decode, and their counters are out of reach
        if batch.get("skipped"):
            self.skipped.update(batch["skipped"])
            for reason, count in self.skipped.items():
                pl_module.log(f"data/skipped_{reason}", float(count), reduce_fx="max")

    def skipped_totals(self) -> dict[str, int]:
        """Skips by reason over all ranks (a collective: call on every rank)."""
        return sum_counts(self.skipped)

    # --- checkpoint --------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        mine = {
            "epoch": self.epoch,
            "batches": self.batches,
            "random": random_states(),
        }
        checkpoint["run_state"] = {
            "ranks": gather_objects(mine),
            "queues": pl_module.objective.queue_state(),
            "skipped": self.skipped_totals(),
        }
        checkpoint["tokenizer_json"] = pl_module.tokenizer_json
        if self.config is not None:
            checkpoint["config"] = self.config

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        state = checkpoint.get("run_state") or legacy_run_state(checkpoint)
        rank, world = rank_and_world()
        # the saved counts are every rank's total: one rank carries them on, or the next sum repeats them
        self.skipped = Counter(state.get("skipped", {}) if rank == 0 else {})
        pl_module.objective.load_queue_state(state.get("queues", {}))
        ranks = state.get("ranks") or []
        datamodule = getattr(trainer, "datamodule", None)
        if not ranks or not hasattr(datamodule, "resume_stream"):
            return
        if len(ranks) == world:
            mine = ranks[rank]
            self.epoch, self.batches, self._random = mine["epoch"], mine["batches"], mine["random"]
            datamodule.resume_stream(self.epoch, self.batches)
            return
        # another number of ranks splits the shards otherwise: no rank's position means anything now
        epoch = max(r["epoch"] for r in ranks) + 1
        log.warning(
            "checkpoint of %d rank(s) resumed on %d: the data stream starts epoch %d afresh (the rest of "
            "epoch %d is not replayed; random states start anew)",
            len(ranks),
            world,
            epoch,
            epoch - 1,
        )
        datamodule.resume_stream(epoch, 0)

    def on_train_start(self, trainer, pl_module) -> None:
        # after the stream has replayed to its position (Lightning draws the first batch before this hook),
        # so nothing the replay draws can shift the model's randomness
        if self._random is not None:
            set_random_states(self._random)
            self._random = None


def legacy_run_state(checkpoint: dict) -> dict:
    """Checkpoints written before ``run_state``: one stream position, rank 0's, for a single rank."""
    stream = checkpoint.get("train_stream")
    ranks = []
    if stream:
        random_part = {"torch": stream["rng"]["torch"], "random": stream["rng"]["random"]}
        ranks = [{"epoch": stream["epoch"], "batches": stream["batches"], "random": random_part}]
    queues, skipped = checkpoint.get("queues", {}), checkpoint.get("data_skipped", {})
    return {"ranks": ranks, "queues": queues, "skipped": skipped}
