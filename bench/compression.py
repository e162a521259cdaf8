"""Bytes per step and retrieval of `shapes_align` trained by 2 gloo ranks under each gradient compression.

Each mode is one command-line run (`trainer=ddp_cpu compression=MODE`, Lightning starting both ranks)
with the same seed, global batch and step budget; the bytes are what the DDP communication hook
all-reduced per optimizer step (counted by CompressedDDPStrategy), next to the uncompressed size.
Rewrites the compression section of docs/results.md. Last line: one JSON object; ``ratio`` = bytes of
PowerSGD / bytes uncompressed, and per mode its bytes ratio and val/r1_mean relative to uncompressed.

    python bench/compression.py [--steps 160] [--batch-size 64] [--modes none,fp16,bf16,powersgd] [--no-write]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_comparison import RESULTS, ROOT, replace_section  # noqa: E402


def run_mode(mode: str, steps: int, batch_size: int, run_dir: Path) -> dict[str, float]:
    command = [
        sys.executable,
        "-m",
        "autoglm_train",
        "trainer=ddp_cpu",
        f"compression={mode}",
        f"data.batch_size={batch_size}",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "trainer.log_every_n_steps=1",
        "trainer.enable_model_summary=false",
        "threads=1",  # one core per rank
        "callbacks=none",
        "logger=csv",
        "progress_bar=false",
        f"hydra.run.dir={run_dir}",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ})
    if done.returncode != 0:
        raise RuntimeError(f"compression={mode} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("comm/bytes")]
    sent = [float(r["comm/bytes"]) for r in rows]
    metrics["comm/bytes_per_step"] = statistics.median(sent)  # steady state: PowerSGD starts late
    metrics["comm/uncompressed_per_step"] = statistics.mean(float(r["comm/bytes_uncompressed"]) for r in rows)
    metrics["comm/steps_logged"] = len(rows)
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=64, help="per rank (global batch = 2x)")
    parser.add_argument("--modes", default="none,fp16,bf16,powersgd")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/results.md alone")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if modes[0] != "none":
        modes.insert(0, "none")  # the baseline every ratio is taken against

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            m = run_mode(mode, args.steps, args.batch_size, Path(tmp) / mode)
            results[mode] = m
            print(
                f"{mode:>9}: {m['comm/bytes_per_step'] / 2**20:7.2f} MiB/step of "
                f"{m['comm/uncompressed_per_step'] / 2**20:.2f}, val/r1_mean {m['val/r1_mean']:.4f}, "
                f"{m['time/samples_per_s']:.1f} samples/s",
                file=sys.stderr,
                flush=True,
            )

    base = results["none"]
    lines = [
        f"`python bench/compression.py --steps {args.steps} --batch-size {args.batch_size}`: "
        f"`experiment=shapes_align trainer=ddp_cpu`, 2 gloo ranks x {args.batch_size} "
        f"(global batch {2 * args.batch_size}), one thread each, {args.steps} steps, seed 0; PowerSGD "
        "with the `compression=powersgd` defaults. Bytes are what the hook all-reduced per optimizer "
        "step (median over the run: PowerSGD sends uncompressed for its first `start_iter` steps), per rank. "
        "samples/s is indicative only: 2 ranks share 2 cores with whatever else runs on the machine.",
        "",
        "| compression | MiB / step | vs none | val/r1_mean | vs none | samples/s |",
        "|---|---|---|---|---|---|",
    ]
    for mode, m in results.items():
        lines.append(
            f"| {mode} | {m['comm/bytes_per_step'] / 2**20:.2f} | "
            f"{m['comm/bytes_per_step'] / base['comm/bytes_per_step']:.3f} | {m['val/r1_mean']:.4f} | "
            f"{m['val/r1_mean'] - base['val/r1_mean']:+.4f} | {m['time/samples_per_s']:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        RESULTS.write_text(
            replace_section(
                RESULTS.read_text(), "compression", "## Gradient compression (2 gloo ranks)\n\n" + table
            )
        )
    summary = {
        mode: {
            "bytes_per_step": round(m["comm/bytes_per_step"]),
            "bytes_ratio": round(m["comm/bytes_per_step"] / base["comm/bytes_per_step"], 4),
            "val_r1_mean": round(m["val/r1_mean"], 4),
            "r1_vs_none": round(m["val/r1_mean"] - base["val/r1_mean"], 4),
        }
        for mode, m in results.items()
    }
    headline = summary.get("powersgd", summary[modes[-1]])["bytes_ratio"]
    print(json.dumps({"bench": "compression", "steps": args.steps, "modes": summary, "ratio": headline}))


if __name__ == "__main__":
    main()
