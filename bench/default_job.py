"""The default job (`make train`) against the previous default (ResNet-18, a 256-wide text tower, 360 steps
with evaluations every 180), one after the other in this script, each `python -m autoglm_train` in its own
process: time, samples/s and every quality figure, and the speed ratio. `--cpu avx2` runs both as a CPU
without native bf16 computes them (oneDNN and ATen limited to AVX2, fp32), on any x86 CPU.

    python bench/default_job.py [--cpu native|avx2] [--rounds 1]
    python bench/default_job.py --cpu avx2 --profile   # each tower's training step, previous vs current

``--profile`` times a forward and backward of each tower alone on one batch of 128 (64 px images,
captions of 24 tokens: the shapes captions' length), median of 10 after 3 warm-up, in this process.
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


def profile(precision: str) -> dict:
    import time

    import torch

    from autoglm_train.model.towers import ImageTower, TextTower

    torch.manual_seed(0)
    images, tokens = torch.randn(128, 3, 64, 64), torch.randint(1, 400, (128, 24))
    towers = {
        "previous": (ImageTower("resnet18", channels_last=True), TextTower(400, 256, 2, 4, 32)),
        "current": (ImageTower("resnet18_narrow", channels_last=True), TextTower(400, 128, 2, 4, 32)),
    }
    dtype = torch.bfloat16 if precision.startswith("bf16") else None

    def step_ms(tower, inputs) -> float:
        times = []
        for i in range(13):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                out = tower(inputs)
            out.float().sum().backward()
            if i >= 3:
                times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    out = {}
    for name, (image, text) in towers.items():
        out[name] = {"image_ms": round(step_ms(image, images), 1), "text_ms": round(step_ms(text, tokens), 1)}
    for part in ("image_ms", "text_ms"):
        out[f"ratio_{part}"] = round(out["previous"][part] / out["current"][part], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", choices=("native", "avx2"), default="native")
    parser.add_argument("--profile", action="store_true", help="each tower's step alone")
    parser.add_argument(
        "--rounds", type=int, default=1, help="alternating rounds; the median time is reported"
    )
    args = parser.parse_args()
    extra = ["trainer.precision=32-true"] if args.cpu == "avx2" else []
    if args.cpu == "avx2":
        os.environ.update(AVX2_ENV)
    if args.profile:
        # torch reads the ISA limits when it loads, and it is loaded by now: once more, in a fresh process
        if args.cpu == "avx2" and os.environ.get("_DEFAULT_JOB_CHILD") != "1":
            os.environ["_DEFAULT_JOB_CHILD"] = "1"
            os.execv(sys.executable, [sys.executable, *sys.argv])
        from autoglm_train.utils.hardware import cpu_precision

        precision = "32-true" if args.cpu == "avx2" else cpu_precision()
        print(json.dumps({"bench": "default_job.profile", "cpu": args.cpu, "precision": precision,
                          **profile(precision)}))  # fmt: skip
        return
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
