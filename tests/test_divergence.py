"""A non-finite loss stops the run at its step on every rank, keeps the last good checkpoint, and fails
its sweep point; trainer.skip_nonfinite_steps=K skips up to K such steps first."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY
from run_probes import read_steps

from autoglm_train import train
from autoglm_train.lit.divergence import NonFiniteError

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent


def probe_env(shapes_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    return {**env, "AUTOGLM_DATA_DIR": str(shapes_dir), "PYTHONPATH": str(TESTS), "PYTHONUNBUFFERED": "1"}


def test_nan_on_one_rank_stops_both_ranks_at_that_step_and_keeps_the_last_checkpoint(shapes_dir, tmp_path):
    run_dir, probe = tmp_path / "run", tmp_path / "probe"
    command = [sys.executable, "-m", "autoglm_train", *TINY, "trainer=ddp_cpu", "threads=1", "logger=none"]
    command += [
        "trainer.max_steps=10",
        "eval.zeroshot.task=null",
        f"hydra.run.dir={run_dir}",
        "+callbacks.nan._target_=run_probes.NaNAt",
        "+callbacks.nan.step=6",
        "+callbacks.nan.rank=1",
        "+callbacks.record._target_=run_probes.RecordSteps",
        f"+callbacks.record.out_dir={probe}",
    ]
    done = subprocess.run(command, env=probe_env(shapes_dir), capture_output=True, text=True, timeout=400)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-3000:]
    # both ranks raise the same error, naming the step and the term, each rank's finding included
    assert out.count("NonFiniteError: training diverged at step 6") == 2, out[-4000:]
    assert "rank 1: loss loss/infonce=nan" in out and "rank 0: loss loss/infonce=nan" in out
    # within the step: neither rank trained on past it (the last completed step is 6 on both)
    assert [max(read_steps(probe, r)) for r in (0, 1)] == [6, 6]
    # the periodic checkpoint of step 4 is the one left, finite, and the error names it
    last = run_dir / "checkpoints" / "last.ckpt"
    assert "are kept: " in out and str(last) in out, out[-3000:]
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
    assert not (run_dir / "metrics.json").exists()


def test_a_diverged_sweep_point_is_a_failed_row(shapes_dir, tmp_path):
    command = [sys.executable, "-m", "autoglm_train", "-m", *TINY, "logger=none", "eval.zeroshot.task=null"]
    command += [
        f"hydra.sweep.dir={tmp_path}",
        "+callbacks.nan._target_=run_probes.NaNAt",
        "+callbacks.nan.step=3,1000",
    ]
    done = subprocess.run(command, env=probe_env(shapes_dir), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    with open(tmp_path / "summary.csv") as f:
        rows = {r["+callbacks.nan.step"]: r for r in csv.DictReader(f)}
    assert rows["1000"]["status"] == "ok" and float(rows["1000"]["val/r1_mean"]) > 0
    assert rows["3"]["status"] == "failed" and rows["3"]["val/r1_mean"] == ""
    assert "NonFiniteError: training diverged at step 3" in rows["3"]["error"]
    failed = json.loads((tmp_path / rows["3"]["run"] / "failed.json").read_text())
    assert "loss/infonce=nan" in failed["error"]


def test_skip_nonfinite_steps_skips_up_to_k_then_stops(tiny_cfg, tmp_path):
    probe = ["+callbacks.nan._target_=run_probes.NaNAt", "trainer.log_every_n_steps=1"]
    # one bad step, one allowed: the run finishes, the skipped step logged, the weights finite
    metrics = train.run(
        tiny_cfg(*probe, "+callbacks.nan.step=3", "trainer.skip_nonfinite_steps=1", output_dir=tmp_path / "a")
    )
    assert metrics["train/steps"] == 8 and math.isfinite(metrics["val/r1_mean"])
    with open(tmp_path / "a" / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["train/nonfinite_skipped"]]
    # the count of skipped steps, logged at every step (Lightning's step is the one after the update)
    skipped = {int(r["step"]): float(r["train/nonfinite_skipped"]) for r in rows}
    assert skipped == {s: float(s >= 3) for s in range(8)}
    saved = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
    # two bad steps, one allowed: the second stops the run, saying one was skipped
    with pytest.raises(NonFiniteError, match=r"diverged at step 5.*\(1 such steps were skipped before\)"):
        train.run(
            tiny_cfg(
                *probe,
                "+callbacks.nan.step=[3,5]",
                "trainer.skip_nonfinite_steps=1",
                output_dir=tmp_path / "b",
            )
        )


def test_a_skipped_step_leaves_weights_buffers_and_optimizer_state_as_they_were(tiny_cfg, tmp_path):
    snapshots = tmp_path / "snapshots"
    probes = [
        "+callbacks.nan._target_=run_probes.NaNAt",
        "+callbacks.nan.step=3",
        "+callbacks.snap._target_=run_probes.SnapshotAround",
        "+callbacks.snap.step=3",
        f"+callbacks.snap.out_dir={snapshots}",
    ]
    train.run(tiny_cfg(*probes, "trainer.skip_nonfinite_steps=1", "trainer.max_steps=5"))
    before, after = (torch.load(snapshots / f"{n}.pt", weights_only=True) for n in ("before", "after"))
    # batch-norm running statistics included: the NaN batch went through the forward pass
    assert any("running_mean" in k for k in before["module"])
    for key, value in before["module"].items():
        assert torch.equal(after["module"][key], value), key
    for index, state in before["optimizer"].items():
        for key, value in state.items():
            assert torch.equal(after["optimizer"][index][key], value), (index, key)
