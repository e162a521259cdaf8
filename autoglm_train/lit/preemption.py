"""Slurm preemption: the warning signal (``#SBATCH --signal=SIGUSR1@90``) leads to a checkpoint that every
rank writes at the same step, then rank 0 requeues the job (which resumes from it, lit/run_state.py).

Lightning's own handler saves from inside the signal handler, on each rank when its signal lands: ranks are
then at different points of their step, and the save's collectives (its barrier, the gather of every rank's
stream position) would pair with another rank's training collectives. Here the handler only notes the
signal; after each optimizer step the ranks agree whether any was signalled (one small all-reduce) and all
save together.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

from autoglm_train.distributed.gather import any_rank

log = logging.getLogger(__name__)


def slurm_requeue_signal(trainer) -> signal.Signals | None:
    """The signal Slurm warns with, when Lightning would requeue this job on it; else None."""
    environment = trainer._accelerator_connector.cluster_environment
    if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
        return environment.requeue_signal
    return None


def requeue_job() -> None:
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if done.returncode == 0:
        log.info("requeued Slurm job %s", job)
    else:
        log.warning("scontrol requeue %s failed (%d): %s", job, done.returncode, done.stderr.strip())


class Preemption(L.Callback):
    def __init__(self) -> None:
        self.signalled = False
        self.active = False
        self._step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning sets its handlers just before training starts; this replaces its save-in-the-handler
        # one (its teardown restores what was there before)
        sig = slurm_requeue_signal(trainer)
        self.active = sig is not None
        if self.active:
            signal.signal(sig, self._note)

    def _note(self, signum, frame) -> None:
        self.signalled = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # at optimizer steps only (the same batches on every rank): a checkpoint mid-accumulation would not
        # resume exactly
        if not self.active or trainer.global_step == self._step:
            return
        self._step = trainer.global_step
        (signalled,) = any_rank([self.signalled], pl_module.device)
        if not signalled:
            return
        self.signalled = False
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        log.info("preemption signal: checkpoint at step %d -> %s", trainer.global_step, path)
        for logger in trainer.loggers:
            logger.save()
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            requeue_job()
