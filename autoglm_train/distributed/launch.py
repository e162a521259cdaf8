"""Who this process is before any process group exists, and files that one rank makes for all.

Lightning creates the process group inside ``trainer.fit``, but every rank already runs the setup before
it: under Slurm ``srun`` starts all ranks at once, under torchrun too, and Lightning's own DDP launcher
re-runs the script for ranks 1.. when rank 0 reaches ``fit``. Work that must happen once per run (training
the BPE tokenizer, writing ``tokenizer.json``) is therefore coordinated through the file system: rank 0
makes the file and then a stamp naming this launch; the other ranks wait for a stamp of theirs.

A run directory is reused by a requeued Slurm job or a restarted torchrun, so a file found there may be
an earlier launch's: the stamp carries a launch id (Slurm job and restart count, torchelastic run and
restart count, or an id rank 0 puts in the environment that Lightning's launcher hands its children) and
a key of the inputs, and a rank accepts only a stamp with both its own.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from autoglm_train.distributed.slurm import slurm_job_key
from autoglm_train.utils.files import atomic_write_json, atomic_write_with

log = logging.getLogger(__name__)

LAUNCH_ID_ENV = "AUTOGLM_LAUNCH_ID"
DEFAULT_WAIT_S = 1800.0  # rank 0 may be training a tokenizer on many captions, or fetching one


@dataclass(frozen=True)
class LaunchRank:
    is_zero: bool
    source: str  # how it was found, for messages: "RANK=1", "single process", ...


def launch_rank() -> LaunchRank:
    """This process's rank as its launcher gave it (the process group's once there is one)."""
    env = os.environ
    if dist.is_available() and dist.is_initialized():
        return LaunchRank(dist.get_rank() == 0, f"process group rank {dist.get_rank()}")
    if "RANK" in env:  # torchrun, or anyone setting torch.distributed's variables
        return LaunchRank(int(env["RANK"]) == 0, f"RANK={env['RANK']}")
    if slurm_job_key() is not None and "SLURM_PROCID" in env:  # srun's tasks, by Lightning's rule
        return LaunchRank(int(env["SLURM_PROCID"]) == 0, f"SLURM_PROCID={env['SLURM_PROCID']}")
    if "LOCAL_RANK" in env or "NODE_RANK" in env:
        # Lightning's launcher: children get LOCAL_RANK, and every node's command its NODE_RANK; the global
        # rank needs the devices per node, unknown before the Trainer, but rank 0 is node 0's local rank 0
        local, node = env.get("LOCAL_RANK", "0"), env.get("NODE_RANK", env.get("GROUP_RANK", "0"))
        return LaunchRank(int(local) == 0 and int(node) == 0, f"NODE_RANK={node} LOCAL_RANK={local}")
    return LaunchRank(True, "single process")


def launch_id() -> str | None:
    """What every process of one launch shares and a relaunch into the same run directory does not."""
    env = os.environ
    job = slurm_job_key()
    if job is not None:
        return f"slurm-{job}.{env.get('SLURM_RESTART_COUNT', '0')}"
    if "TORCHELASTIC_RUN_ID" in env:
        return f"torchelastic-{env['TORCHELASTIC_RUN_ID']}.{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return env.get(LAUNCH_ID_ENV)


def claim_launch_id() -> str:
    """Rank 0: the launch id, made up when the launcher gives none. Lightning's launcher starts the other
    ranks with a copy of this process's environment, so they find the same id there."""
    found = launch_id()
    if found is None:
        found = os.environ[LAUNCH_ID_ENV] = uuid.uuid4().hex
    return found


def stamp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.launch")


def made_once_per_launch(
    path: str | Path, make_file: Callable[[Path], None], inputs_key: str, timeout_s: float = DEFAULT_WAIT_S
) -> str:
    """Rank 0 runs ``make_file(tmp)`` and renames what it wrote to ``path``; the other ranks wait for
    it. Every rank returns the file's text. ``inputs_key`` names what the file is made from (a hash of
    the config): a stamp of other inputs is never taken for this run's."""
    path = Path(path)
    rank = launch_rank()
    if rank.is_zero:
        _make_and_stamp(path, make_file, inputs_key)
    else:
        _wait_for_stamp(path, inputs_key, rank, timeout_s)
    return path.read_text(encoding="utf-8")


def _make_and_stamp(path: Path, make_file: Callable[[Path], None], inputs_key: str) -> None:
    stamp = {"launch": claim_launch_id(), "inputs": inputs_key}
    try:
        atomic_write_with(path, make_file)
    except Exception as exc:
        # the waiting ranks fail now, with rank 0's reason, instead of at their timeout
        atomic_write_json(stamp_path(path), stamp | {"error": f"{type(exc).__name__}: {exc}"})
        raise
    atomic_write_json(stamp_path(path), stamp)  # after the file: a stamp of ours means the file is ours


def _wait_for_stamp(path: Path, inputs_key: str, rank: LaunchRank, timeout_s: float) -> None:
    ours = launch_id()
    if ours is None:
        log.warning(
            "%s: no launch id in this rank's environment (%s): a %s left in the run directory by an "
            "earlier launch with the same inputs would be taken for this one's",
            path.name,
            rank.source,
            path.name,
        )
    deadline = time.monotonic() + timeout_s
    while True:
        stamp = _read_stamp(stamp_path(path))
        if stamp and stamp.get("inputs") == inputs_key and (ours is None or stamp.get("launch") == ours):
            if "error" in stamp:
                raise RuntimeError(f"rank 0 failed to make {path}: {stamp['error']}")
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{rank.source}: waited {timeout_s:g}s for rank 0 to write {path} (launch {ours}) and it "
                "did not: see rank 0's log for its error; the run directory must be on a file system "
                "that every rank sees"
            )
        time.sleep(0.2)


def _read_stamp(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
