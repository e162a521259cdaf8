"""Hydra multirun sweeps on the tiny config: run directories, the summary table, failures, Optuna."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def sweep(shapes_dir, sweep_dir, *overrides):
    env = {
        **os.environ,
        "AUTOGLM_DATA_DIR": str(shapes_dir),
        "PYTHONUNBUFFERED": "1",
        "WANDB_MODE": "disabled",
    }
    args = [
        sys.executable,
        "-m",
        "autoglm_train",
        "--multirun",
        *TINY,
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "logger=none",
        "callbacks=none",
        "eval.zeroshot.task=null",  # a sweep's rows need val/r1_mean only
        f"hydra.sweep.dir={sweep_dir}",
        *overrides,
    ]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    with open(sweep_dir / "summary.csv") as f:
        return list(csv.DictReader(f))


def test_two_by_two_grid_writes_four_runs_and_a_sorted_summary(shapes_dir, tmp_path):
    rows = sweep(
        shapes_dir,
        tmp_path / "grid",
        "loss=infonce_triplet",
        "loss.margin=0.1,0.2",
        "loss.temperature=0.05,0.07",
    )
    assert len(list((tmp_path / "grid").glob("*/metrics.json"))) == 4
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert {(r["loss.margin"], r["loss.temperature"]) for r in rows} == {
        (m, t) for m in ("0.1", "0.2") for t in ("0.05", "0.07")
    }
    assert all("loss=infonce_triplet" in r["overrides"] for r in rows)
    scores = [float(r["val/r1_mean"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert (tmp_path / "grid" / "summary.md").read_text().count("| ok |") == 4


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(shapes_dir, tmp_path):
    rows = sweep(shapes_dir, tmp_path / "fail", "loss=triplet", "loss.mining=bogus,hard")
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert "loss.mining" in rows[1]["error"] and rows[0]["loss.mining"] == "hard"


def test_optuna_search_of_margin_and_temperature(shapes_dir, tmp_path):
    rows = sweep(
        shapes_dir,
        tmp_path / "optuna",
        "hparams_search=margin_temperature",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2",
    )
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    assert all(
        0.05 <= float(r["loss.margin"]) <= 0.4 and 0.02 <= float(r["loss.temperature"]) <= 0.1 for r in rows
    )
    assert (tmp_path / "optuna" / "optimization_results.yaml").exists()
