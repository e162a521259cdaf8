"""The default job (`make train`) against the previous default (ResNet-18, a 256-wide text tower, 360 steps
with evaluations every 180), one after the other in this script, each `python -m autoglm_train` in its own
process: time, samples/s and every quality figure, and the speed ratio. `--cpu avx2` runs both as a CPU
without native bf16 computes them (oneDNN and ATen limited to AVX2, fp32), on any x86 CPU.

    python bench/default_job.py [--cpu native|avx2] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from lowrank_heads import run_job  # noqa: E402

PREVIOUS_DEFAULT = [
    "model.image_tower.name=resnet18",
    "model.text_tower.width=256",
    "trainer.max_steps=360",
    "trainer.val_check_interval=180",
]
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
FIGURES = (
    "val/r1_mean",
    "val/i2t_r1",
    "val/t2i_r1",
    "val/hard_r1_shape",
    "val/hard_r1_colour",
    "val/hard_r1_position",
    "val/hard_r1_size",
    "zeroshot/shape_top1",
    "zeroshot/colour_top1",
    "time/samples_per_s",
    "time/run_s",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", choices=("native", "avx2"), default="native")
    parser.add_argument(
        "--rounds", type=int, default=1, help="alternating rounds; the median time is reported"
    )
    args = parser.parse_args()
    extra = ["trainer.precision=32-true"] if args.cpu == "avx2" else []
    if args.cpu == "avx2":
        os.environ.update(AVX2_ENV)
    work = Path(tempfile.mkdtemp(prefix="default_job_"))
    runs: dict[str, list[dict]] = {"previous": [], "current": []}
    for round_ in range(args.rounds):
        for name, overrides in (("previous", PREVIOUS_DEFAULT), ("current", [])):
            metrics = run_job([*overrides, *extra], work / f"{name}-{round_}")
            runs[name].append(metrics)
            print(
                f"round {round_} {name}: run {metrics['time/run_s']:.1f} s, "
                f"r1_mean {metrics['val/r1_mean']:.4f}",
                flush=True,
            )
    rows = {}
    for name, results in runs.items():
        # the runs are deterministic: quality is the first round's, time the median of the rounds
        row = {k: round(results[0][k], 4) for k in FIGURES if k in results[0]}
        row["time/run_s"] = round(statistics.median(r["time/run_s"] for r in results), 1)
        row["time/samples_per_s"] = round(statistics.median(r["time/samples_per_s"] for r in results), 1)
        rows[name] = row
    ratio = rows["previous"]["time/run_s"] / rows["current"]["time/run_s"]
    print(
        json.dumps(
            {
                "bench": "default_job",
                "cpu": args.cpu,
                "rounds": args.rounds,
                **rows,
                "speedup_run_s": round(ratio, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
