"""Sweep summary: one table (CSV and Markdown) of a multirun's runs, their overrides and metrics.

Attached as a Hydra callback (``hydra.callbacks.sweep_summary`` in conf/train.yaml), so it works the same
for the basic launcher, the Optuna sweeper and the Slurm launcher. It reads what each run left in its
directory: ``metrics.json`` (succeeded) or ``failed.json`` (failed, with the error).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from autoglm_train.utils.files import atomic_write_text

log = logging.getLogger(__name__)

SUMMARY_METRICS = (
    "val/r1_mean",
    "val/i2t_r1",
    "val/t2i_r1",
    "val/i2t_r5",
    "val/t2i_r5",
    "val/i2t_r10",
    "val/t2i_r10",
    "train/steps",
    "time/train_s",
)


def collect_runs(sweep_dir: Path) -> list[dict]:
    runs = []
    for overrides_file in sorted(sweep_dir.glob("*/.hydra/overrides.yaml")):
        run_dir = overrides_file.parent.parent
        overrides = yaml.safe_load(overrides_file.read_text()) or []
        row: dict = {"run": run_dir.name, "overrides": " ".join(overrides)}
        row["_params"] = dict(o.split("=", 1) for o in overrides if "=" in o)
        if (run_dir / "metrics.json").exists():
            row["status"] = "ok"
            row.update(json.loads((run_dir / "metrics.json").read_text()))
        elif (run_dir / "failed.json").exists():
            row["status"] = "failed"
            row["error"] = json.loads((run_dir / "failed.json").read_text()).get("error", "")
        else:
            row["status"] = "incomplete"
        runs.append(row)
    return runs


def write_summary(sweep_dir: str | Path, metric: str = "val/r1_mean") -> list[dict]:
    """Writes ``summary.csv`` and ``summary.md`` in ``sweep_dir``, best ``metric`` first, failures last."""
    sweep_dir = Path(sweep_dir)
    runs = collect_runs(sweep_dir)
    runs.sort(key=lambda r: (r["status"] != "ok", -float(r.get(metric, float("-inf")))))
    # the swept keys (values that differ between runs) get a column each; fixed overrides stay in the CSV
    keys = sorted({k for r in runs for k in r["_params"]})
    swept = [k for k in keys if len({r["_params"].get(k) for r in runs}) > 1]
    for r in runs:
        r.update({k: r["_params"].get(k, "") for k in swept})
    metrics = [metric] + [m for m in SUMMARY_METRICS if m != metric]
    columns = ["run", "status", *swept, *metrics, "error"]
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=[*columns, "overrides"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(runs)
    atomic_write_text(sweep_dir / "summary.csv", table.getvalue())

    def cell(row: dict, key: str) -> str:
        value = row.get(key, "")
        if isinstance(value, float):
            return f"{value:.4f}" if not value.is_integer() else str(int(value))
        return str(value).replace("|", "\\|").replace("\n", " ")[:200]

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in runs]
    atomic_write_text(
        sweep_dir / "summary.md",
        f"# Sweep summary ({sweep_dir})\n\nSorted by `{metric}`.\n\n" + "\n".join(lines) + "\n",
    )
    return runs


class SweepSummary(Callback):
    def __init__(self, metric: str = "val/r1_mean"):
        self.metric = metric

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        runs = write_summary(sweep_dir, self.metric)
        failed = sum(r["status"] != "ok" for r in runs)
        log.info("sweep summary of %d runs (%d failed): %s", len(runs), failed, sweep_dir / "summary.md")
