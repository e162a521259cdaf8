"""bench/gpu_checks.sh dry-runs on the CPU (DRY_RUN=1, toy sizes), so that the one call a lent GPU gets
does not fail on a mistake of the script: each check prints its JSON figures and none fails."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_gpu_checks_script_dry_runs_on_cpu(shapes_dir, tmp_path):
    env = {
        **os.environ,
        "DRY_RUN": "1",
        "CHECKS": "tests vs max_batch",
        "OUT": str(tmp_path / "out"),
        "PYTHON": sys.executable,
        "AUTOGLM_DATA_DIR": str(shapes_dir),
        "AUTOGLM_LOG_DIR": str(tmp_path / "outputs"),
    }
    done = subprocess.run(
        ["bash", "bench/gpu_checks.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    figures = [json.loads(line) for line in (tmp_path / "out" / "figures.jsonl").read_text().splitlines()]
    assert not [f for f in figures if f.get("failed")], figures
    assert {f["check"] for f in figures} == {"tests", "vs", "max_batch"}
    vs = next(f for f in figures if f["check"] == "vs")
    assert vs["same_batches"]["ours"] > 0 and vs["own_pipelines"]["open_clip"] > 0
    strategies = {f["strategy"] for f in figures if f.get("figure") == "max_batch_dry_run"}
    assert strategies == {"ddp", "fsdp"}
