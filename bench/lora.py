"""LoRA (``model.lora.enabled=true``, rank 8 on the default targets of both towers) against full fine-tuning
of a ViT-B/16-sized dual encoder on CPU (``model=vit_b16``: ViT-B/16 image tower, 12-layer 512-wide text
transformer, 512-d heads): trainable parameters, AdamW state, per-step memory and samples/s.

Each (mode, round) runs in its own subprocess (``--worker MODE``), built from the same seed, on the same
batch, the modes alternating round by round. A worker measures, from the model built to the end of its
steps, the rise of the peak resident set (``VmHWM`` reset first, ``bench/loss_memory.PeakMemory``): the
gradients, the optimizer state made at the first step and the activations, i.e. what a step costs beyond the
weights; and counts exactly the bytes of the AdamW state and of the gradients. Speed: the median step time
of the timed steps of every round (the first step of each worker, which allocates the state, untimed).
Last line: one JSON object with the figures of both and ``ratio`` = LoRA / full AdamW state bytes (target
<= 0.02).

    python bench/lora.py [--batch-size 4] [--steps 2] [--rounds 2] [--rank 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_memory import PeakMemory  # noqa: E402

MODES = ("full", "lora")


def build(mode: str, rank: int):
    from autoglm_train.model.dual_encoder import DualEncoder
    from autoglm_train.model.towers import ImageTower, TextTower

    torch.manual_seed(0)
    lora = {"enabled": True, "rank": rank, "alpha": 2 * rank, "targets": {}} if mode == "lora" else None
    image = ImageTower("vit_base_patch16_224")
    text = TextTower(vocab_size=49408, width=512, depth=12, heads=8, context_length=77)
    return DualEncoder(image, text, embed_dim=512, lora=lora)


def worker(mode: str, batch_size: int, steps: int, rank: int) -> dict:
    from autoglm_train.losses.infonce import infonce_loss

    torch.set_num_threads(2)
    model = build(mode, rank).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch_size, 3, 224, 224, generator=g)
    tokens = torch.randint(1, 49408, (batch_size, 32), generator=g)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.1)

    def step() -> float:
        start = time.perf_counter()
        image, text, scale = model(images, tokens)
        infonce_loss(image, text, image, text, scale).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as between Lightning's steps
        return time.perf_counter() - start

    with PeakMemory(torch.device("cpu")) as memory:
        step()
        times = [step() for _ in range(steps)]
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in trainable),
        "optimizer_state_bytes": state,
        "grad_bytes": sum(p.numel() * p.element_size() for p in trainable),
        "step_peak_bytes": memory.peak,
        "step_s": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--worker", choices=MODES)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch_size, args.steps, args.rank)))
        return
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            cmd = [sys.executable, __file__, "--worker", mode, "--batch-size", str(args.batch_size)]
            cmd += ["--steps", str(args.steps), "--rank", str(args.rank)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = {}
    for mode, results in runs.items():
        step = statistics.median(t for r in results for t in r["step_s"])
        rows[mode] = {
            "params": results[0]["params"],
            "trainable": results[0]["trainable"],
            "trainable_pct": round(100 * results[0]["trainable"] / results[0]["params"], 3),
            "optimizer_state_mb": round(results[0]["optimizer_state_bytes"] / 2**20, 2),
            "grad_mb": round(results[0]["grad_bytes"] / 2**20, 2),
            "step_peak_mb": round(statistics.median(r["step_peak_bytes"] for r in results) / 2**20, 1),
            "samples_per_s": round(args.batch_size / step, 3),
        }
        print(f"{mode}: {rows[mode]}", flush=True)
    ratio = runs["lora"][0]["optimizer_state_bytes"] / runs["full"][0]["optimizer_state_bytes"]
    print(
        json.dumps(
            {
                "bench": "lora",
                "model": "vit_b16 (ViT-B/16 + 12x512 text, embed 512), CPU fp32",
                "batch_size": args.batch_size,
                "rank": args.rank,
                **{f"{mode}": row for mode, row in rows.items()},
                "target": "optimizer state <= 2% of full fine-tuning",
                "ratio": round(ratio, 5),
            }
        )
    )


if __name__ == "__main__":
    main()
