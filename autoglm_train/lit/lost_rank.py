"""``LostRankWatch``: while a multi-rank job fits, a lost rank ends every other rank promptly, with a message
naming the lost rank and the step (the heartbeat and the exit are distributed/liveness.py's).

Three ways a rank learns that a peer is gone: its watch finds the peer's heartbeat silent (a hang: NCCL, a
lost node); a collective fails in the training loop (gloo, when a peer's sockets close) or times out
(``trainer.collective_timeout``); the launcher signals it (SIGTERM: ``srun --kill-on-bad-exit``, torchrun,
scancel). On the last two this callback's ``on_exception`` gives the watch a few seconds to name the silent
peer, then ends this rank itself. Any other error of this rank is left to propagate as usual; the others
then find this rank silent, and name it with its error.
"""

from __future__ import annotations

import logging
import threading
import time

import lightning as L
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import SIGTERMException

from autoglm_train.distributed.launch import launch_id
from autoglm_train.distributed.liveness import (
    DEFAULT_COLLECTIVE_TIMEOUT_S,
    SILENT_AFTER_FAILURE_S,
    PeerWatch,
    end_this_rank,
    is_collective_failure,
    job_store,
)

log = logging.getLogger(__name__)


def launched_children(trainer) -> dict:
    """{global rank: Popen} of the ranks Lightning's local launcher started from this process (rank 0 of
    each node); stands down Lightning's observer of them, which would SIGKILL this process when one dies
    (no message, its loader workers orphaned): the watch reads their exit status itself."""
    procs = getattr(trainer.strategy.launcher, "procs", None) or []
    if not procs:
        return {}
    try:
        from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
    except ImportError:  # another Lightning: its observer, if any, stays
        _ChildProcessObserver = ()
    for thread in threading.enumerate():
        if isinstance(thread, _ChildProcessObserver) and thread._child_processes is procs:
            thread._run = lambda: True  # its loop ends at its next wake-up, without acting
    first = trainer.node_rank * trainer.num_devices
    return {first + local: proc for local, proc in enumerate(procs, start=1)}


class LostRankWatch(L.Callback):
    def __init__(self, collective_timeout: float | None = None):
        self.collective_timeout = float(collective_timeout or DEFAULT_COLLECTIVE_TIMEOUT_S)
        self.watch: PeerWatch | None = None
        self.step = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or trainer.world_size < 2 or not (dist.is_available() and dist.is_initialized()):
            return
        self.watch = PeerWatch(
            trainer.global_rank,
            trainer.world_size,
            job_store(timeout_s=max(5.0, self.collective_timeout / 10)),
            # half the process group's timeout: named before NCCL's watchdog aborts without a name
            silent_after=self.collective_timeout / 2,
            step=lambda: self.step,
            children=launched_children(trainer),
            prefix=f"autoglm/liveness/{launch_id() or 'run'}",
        )
        self.watch.start()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step = trainer.global_step

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        watch = self.watch
        if watch is None:
            return
        if not (is_collective_failure(exception) or isinstance(exception, SIGTERMException)):
            # this rank's own error: it propagates as usual; the others name this rank when it goes silent
            watch.note_failure(f"{type(exception).__name__}: {exception}".splitlines()[0])
            watch.stop(done=False)
            self.watch = None
            return
        what = "received SIGTERM" if isinstance(exception, SIGTERMException) else "a collective failed"
        first_line = str(exception).strip().splitlines()[0] if str(exception).strip() else ""
        log.warning("rank %d: %s at step %d (%s)", watch.rank, what, self.step, first_line)
        watch.collective_failed()
        # the watch names a silent peer within a few beats (and ends this rank itself)
        deadline = time.monotonic() + SILENT_AFTER_FAILURE_S + 3 * watch.interval
        while time.monotonic() < deadline and watch.verdict is None:
            time.sleep(0.1)
        if watch.verdict is not None:
            end_this_rank(watch.message(), also_kill=watch.tree)
        end_this_rank(
            f"rank {watch.rank}: {what} at step {self.step} and no peer has missed its heartbeat "
            f"({first_line}); stopping rank {watch.rank} (exit 1). If a rank was busy for longer on "
            f"purpose (a slow checkpoint write), raise trainer.collective_timeout "
            f"(now {self.collective_timeout:g} s)",
            also_kill=watch.tree,
        )

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.watch is not None:
            self.watch.stop(done=True)
            self.watch = None
