"""Slurm facts the config needs before torch is loaded: the run name and the tasks per node.

Under a Slurm job step every task composes the config on its own, so the run directory cannot come
from a clock (ranks would disagree by a second) and must survive a requeue (same job id, so the
requeued job finds its own checkpoint). The rule for "under Slurm" is Lightning's
(``SLURMEnvironment.detect``): tasks were created by ``srun`` and the job is not an interactive shell.
"""

from __future__ import annotations

import os
from datetime import datetime

from omegaconf import OmegaConf

INTERACTIVE_JOB_NAMES = ("bash", "interactive")


def slurm_job_key() -> str | None:
    """``<job id>`` (``<array job>_<task>`` for array jobs) when this process is a Slurm task, else None."""
    if "SLURM_NTASKS" not in os.environ or os.environ.get("SLURM_JOB_NAME") in INTERACTIVE_JOB_NAMES:
        return None
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        return f"{array_job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return os.environ.get("SLURM_JOB_ID")


def run_name(time_format: str) -> str:
    """``slurm-<job>`` under Slurm, else the start time in ``time_format``."""
    job = slurm_job_key()
    return f"slurm-{job}" if job else datetime.now().strftime(time_format)


def tasks_per_node(devices) -> int:
    """``trainer.devices`` as a Slurm task count: one task per device, so it must be a number."""
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(
            f"hydra/launcher=slurm starts one task per device and needs trainer.devices as a number of "
            f"GPUs per node (got {devices!r}); e.g. trainer.devices=4"
        )
    return devices


def register_resolvers() -> None:
    # cached: one process asks twice (run dir, output dir) and must get one answer
    OmegaConf.register_new_resolver("run_name", run_name, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("tasks_per_node", tasks_per_node, replace=True)
