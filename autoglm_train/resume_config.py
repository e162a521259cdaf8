"""Resuming with a changed config: what may change, what may not, and the user's word for the rest.

A checkpoint carries the config of the run that wrote it (``lit/run_state.py``). A resume compares its
own composed config with it, key by key. Keys that only say how long to run, how to log, validate or
checkpoint, and where to write, may change (``SAFE``); so may the number of ranks and the per-rank batch
as long as the global batch stays the same (the data stream then starts its epoch afresh: see
``RunState``). Every other change (the model, the tokenizer, the loss, the data and its order, the global
batch, the optimizer and its schedule, the seed) is refused, each key with its old and new value, unless
``resume.allow_changes`` names it (or a key above it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

log = logging.getLogger(__name__)

# dotted keys (or a prefix ending in ".") that may change between a run and its resume
SAFE = (
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.max_time",
    "trainer.val_check_interval",
    "trainer.check_val_every_n_epoch",
    "trainer.limit_val_batches",
    "trainer.num_sanity_val_steps",
    "trainer.log_every_n_steps",
    "trainer.enable_model_summary",
    "trainer.enable_progress_bar",
    "trainer.collective_timeout",
    "trainer.skip_nonfinite_steps",
    "data.timeout",
    "data.eval_batch_size",
    "data.missing_hint",
    "eval.",
    "logger.",
    "callbacks.",
    "paths.",
    "resume.",
    "checkpoint.keep_last",
    "ckpt_path",
    "init_from",  # read at the start only: a resumed run takes every weight from its checkpoint
    "progress_bar",
    "threads",
    "optimized_metric",
    "task_name",
)
# how many samples one optimizer step sees: these may change together while their product does not
GLOBAL_BATCH = ("data.batch_size", "trainer.devices", "trainer.num_nodes", "trainer.accumulate_grad_batches")
# how the ranks are made and talk: changes with the number of ranks (trainer=cpu -> ddp_cpu)
LAUNCH = ("trainer.strategy.", "trainer.accelerator")


class ResumeConfigError(ValueError):
    """A resume whose config changes what the checkpoint's run was: model, loss, data order, batch."""


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(config, Mapping):
        out: dict[str, Any] = {}
        for key, value in config.items():
            out |= flatten(value, f"{prefix}{key}.")
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): config}


def changes(old: Mapping, new: Mapping) -> dict[str, tuple[Any, Any]]:
    """Every dotted key whose value differs (``<absent>`` where one side lacks it)."""
    a, b, missing = flatten(old), flatten(new), "<absent>"
    pairs = {k: (a.get(k, missing), b.get(k, missing)) for k in sorted(a.keys() | b.keys())}
    return {k: pair for k, pair in pairs.items() if pair[0] != pair[1]}


def matches(key: str, patterns: Iterable[str]) -> bool:
    return any(key == p.rstrip(".") or key.startswith(p.rstrip(".") + ".") for p in patterns)


def global_batch(config: Mapping) -> int | None:
    flat = flatten(config)
    try:
        devices = flat.get("trainer.devices", 1)
        devices = len(devices) if isinstance(devices, list) else int(devices)
        return (
            int(flat["data.batch_size"])
            * devices
            * int(flat.get("trainer.num_nodes", 1))
            * int(flat.get("trainer.accumulate_grad_batches", 1) or 1)
        )
    except (KeyError, TypeError, ValueError):  # "auto" devices and the like: not comparable here
        return None


def check_resume_config(saved: Mapping | None, new: Mapping, allow: Iterable[str] = ()) -> list[str]:
    """Refuse (``ResumeConfigError``) a resume whose config changes a key that is neither safe nor
    allowed; return the changed keys accepted, each as ``key: old -> new`` (for the log)."""
    if saved is None:  # checkpoints written before they carried their config
        log.warning("the checkpoint holds no config (an older run): the resumed config is not checked")
        return []
    allow = list(allow)
    diff = changes(saved, new)
    same_global_batch = global_batch(saved) is not None and global_batch(saved) == global_batch(new)
    refused, accepted = [], []
    for key, (old, value) in diff.items():
        line = f"{key}: {old!r} -> {value!r}"
        batch_shape = key in GLOBAL_BATCH or matches(key, LAUNCH)
        if matches(key, SAFE) or matches(key, allow) or (batch_shape and same_global_batch):
            accepted.append(line)
        else:
            refused.append((key, line))
    if refused:
        keys = [key for key, _ in refused]
        batch_note = ""
        if any(k in GLOBAL_BATCH for k in keys):
            batch_note = (
                f"\n(the global batch, data.batch_size x devices x nodes x accumulation, was "
                f"{global_batch(saved)} and would be {global_batch(new)})"
            )
        raise ResumeConfigError(
            "this resume changes what the checkpoint's run was:\n  "
            + "\n  ".join(line for _, line in refused)
            + batch_note
            + "\nStart a new run (another hydra.run.dir), or accept these knowingly: "
            + f"resume.allow_changes=[{','.join(keys)}]"
        )
    return accepted
