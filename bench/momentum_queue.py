"""Momentum encoder + negative queue on shapes_align at a small batch, against plain InfoNCE.

1. Accuracy: val/r1_mean after the same number of steps at batch 32 for: plain in-batch InfoNCE (the
   baseline), momentum + queue, and momentum + queue + distillation. Same seed, data and model.
2. Cost: per-step time of the training step with momentum + queue against without, interleaved round
   by round on one fixed batch in this process (the ratio is what matters on a shared machine).

Rewrites the momentum section of docs/results.md. Last line: one JSON object, ``ratio`` = the step-time
overhead (with / without).

    python bench/momentum_queue.py [--steps 400] [--batch-size 32] [--queue 4096] [--no-write]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from autoglm_train.losses.infonce import InfoNCE
from autoglm_train.losses.objective import Objective
from autoglm_train.model.dual_encoder import DualEncoder
from autoglm_train.model.momentum import MomentumEncoder
from autoglm_train.model.towers import ImageTower, TextTower

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_comparison import RESULTS, replace_section, run_variant  # noqa: E402
from step_overhead import shapes_batch  # noqa: E402


def accuracy(steps: int, batch: int, queue: int) -> dict[str, dict[str, float]]:
    common = [
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        f"data.batch_size={batch}",
        "logger=none",
        "callbacks=none",
        "progress_bar=false",
        "trainer.enable_model_summary=false",
    ]
    variants = {
        "infonce, in-batch negatives": [],
        f"+ momentum 0.995 + queue {queue}": ["momentum.enabled=true", f"loss.queue_size={queue}"],
        f"+ momentum + queue {queue} + distillation 0.4": [
            "momentum.enabled=true",
            f"loss.queue_size={queue}",
            "loss.distill_alpha=0.4",
            f"loss.distill_ramp_steps={steps // 4}",
        ],
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides) in enumerate(variants.items()):
            results[name] = run_variant(common + overrides, Path(tmp) / str(i))
            print(f"{name}: val/r1_mean {results[name]['val/r1_mean']:.4f}", file=sys.stderr, flush=True)
    return results


def step_seconds(model, momentum, objective, optimizer, batch, steps: int) -> float:
    ids = torch.arange(batch["image"].shape[0])
    start = time.perf_counter()
    for step in range(steps):
        image, text, scale = model(batch["image"], batch["text"])
        keys = momentum.encode(batch["image"], batch["text"]) if momentum is not None else None
        loss = objective(image, text, scale, ids, step=step, momentum=keys)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if momentum is not None:
            momentum.update(model, step=step)
    return (time.perf_counter() - start) / steps


def overhead(batch_size: int, queue: int, rounds: int = 3, steps: int = 15) -> tuple[float, float]:
    batch, vocab = shapes_batch(batch_size)
    torch.manual_seed(0)
    initial = DualEncoder(ImageTower("resnet18"), TextTower(vocab, 256, 2, 4, 32), embed_dim=256)
    times: dict[str, list[float]] = {"plain": [], "momentum": []}
    for _ in range(rounds):
        for name in times:
            model = copy.deepcopy(initial)
            momentum = MomentumEncoder(model, 0.995) if name == "momentum" else None
            objective = Objective({"infonce": InfoNCE()}, queue_size=queue if momentum else 0)
            optimizer = torch.optim.AdamW(model.param_groups(0.1), lr=1e-3)
            step_seconds(model, momentum, objective, optimizer, batch, 2)  # warm-up
            times[name].append(step_seconds(model, momentum, objective, optimizer, batch, steps))
    return statistics.median(times["plain"]), statistics.median(times["momentum"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--queue", type=int, default=4096)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    plain_s, momentum_s = overhead(args.batch_size, args.queue)
    print(
        f"step time: plain {plain_s * 1000:.1f} ms, momentum + queue {momentum_s * 1000:.1f} ms",
        file=sys.stderr,
    )
    results = accuracy(args.steps, args.batch_size, args.queue)
    lines = [
        f"`python bench/momentum_queue.py --steps {args.steps} --batch-size {args.batch_size}"
        f" --queue {args.queue}`:",
        f"`experiment=shapes_align` at batch {args.batch_size}, {args.steps} steps each, seed 0.",
        "",
        "| setup | val/r1_mean | i2t R@1 | t2i R@1 | i2t R@5 | t2i R@5 |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in results.items():
        lines.append(
            f"| {name} | {m['val/r1_mean']:.4f} | {m['val/i2t_r1']:.4f} | {m['val/t2i_r1']:.4f} | "
            f"{m['val/i2t_r5']:.4f} | {m['val/t2i_r5']:.4f} |"
        )
    lines += [
        "",
        f"Per-step time at batch {args.batch_size} (ResNet-18 + 2-layer text tower, fixed batch, median of 3",
        f"interleaved rounds): plain {plain_s * 1000:.1f} ms, momentum + queue {momentum_s * 1000:.1f} ms,",
        f"overhead ratio **{momentum_s / plain_s:.3f}** (mostly the momentum forward pass of both towers).",
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        text = RESULTS.read_text() if RESULTS.exists() else "# Results\n"
        RESULTS.write_text(
            replace_section(text, "momentum_queue", "## Momentum encoder and queue\n\n" + table)
        )
    print(
        json.dumps(
            {
                "bench": "momentum_queue",
                "batch_size": args.batch_size,
                "steps": args.steps,
                "queue": args.queue,
                **{f"{k}/val_r1_mean": round(v["val/r1_mean"], 4) for k, v in results.items()},
                "plain_step_ms": round(plain_s * 1000, 2),
                "momentum_step_ms": round(momentum_s * 1000, 2),
                "ratio": round(momentum_s / plain_s, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
