"""Samples/s of our training step (Lightning Trainer + DualEncoderModule + Objective) against a bare
PyTorch loop doing the same forward, InfoNCE loss, backward and AdamW step on the same model and batch.

Both run in this process, interleaved round by round (bare, ours, bare, ours, ...) so that machine noise
hits both alike; each round starts from the same initial weights and times the steps after a warm-up.
Rewrites the step-overhead section of docs/results.md. Last line: one JSON object with both figures and
``ratio`` = ours / bare (target >= 0.95).

    python bench/step_overhead.py [--batch-size 128] [--steps 20] [--warmup 3] [--rounds 3] [--no-write]
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch

from autoglm_train.data.shapes import captions_for, render, sample_shapes
from autoglm_train.data.tokenizer import train_bpe
from autoglm_train.lit.module import DualEncoderModule
from autoglm_train.losses.infonce import InfoNCE, infonce_loss
from autoglm_train.losses.objective import Objective
from autoglm_train.model.dual_encoder import DualEncoder
from autoglm_train.model.towers import ImageTower, TextTower
from autoglm_train.train import core_callbacks
from autoglm_train.utils.hardware import cpu_precision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_comparison import RESULTS, replace_section  # noqa: E402

# as the default job runs: fused AdamW, channels_last image tower, bf16 autocast where the CPU has it
OPTIMIZER = partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6, fused=True)


def shapes_batch(batch_size: int, image_size: int = 64):
    """One real batch of the default job: rendered shapes, normalized like the pipeline, BPE tokens."""
    rng = random.Random(0)
    scenes = [sample_shapes(rng) for _ in range(batch_size)]
    captions = [captions_for(s)[0] for s in scenes]
    tokenizer = train_bpe(captions * 4, vocab_size=400, context_length=32)
    images = torch.stack(
        [torch.from_numpy(np.asarray(render(s, rng, image_size), dtype=np.float32)) for s in scenes]
    )
    images = (
        ((images / 255 - 0.45) / 0.225).reshape(batch_size, image_size, image_size, 3).permute(0, 3, 1, 2)
    )
    return {"image": images.contiguous(), "text": tokenizer(captions)}, tokenizer.vocab_size


class Repeat(torch.utils.data.IterableDataset):
    def __init__(self, batch: dict, n: int):
        self.batch, self.n = batch, n

    def __iter__(self):
        for _ in range(self.n):
            yield self.batch


class StepTimer(L.Callback):
    """Times training steps ``warmup+1 .. end`` from batch start to batch end."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = synced_clock()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end = synced_clock()


def synced_clock() -> float:
    """The time once queued GPU work is done (a GPU step returns before its kernels finish)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def timed_trainer(warmup: int, steps: int, precision: str, accelerator: str = "cpu"):
    """A bare Trainer for ``warmup + steps`` steps with the callbacks every run has, and its step timer."""
    timer = StepTimer(warmup)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer, *core_callbacks()],  # as train.py runs it
    )
    return trainer, timer


def run_ours(model: DualEncoder, batch: dict, steps: int, warmup: int, precision: str) -> float:
    module = DualEncoderModule(model, Objective({"infonce": InfoNCE()}), optimizer=OPTIMIZER)
    trainer, timer = timed_trainer(warmup, steps, precision)
    loader = torch.utils.data.DataLoader(Repeat(batch, warmup + steps), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return timer.end - timer.start


def run_bare(model: DualEncoder, batch: dict, steps: int, warmup: int, precision: str) -> float:
    optimizer = OPTIMIZER(model.param_groups(0.1))
    model.train()
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            image, text, scale = model(batch["image"], batch["text"])
            loss = infonce_loss(image, text, image, text, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default=cpu_precision(), choices=("32-true", "bf16-mixed"))
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/results.md alone")
    args = parser.parse_args()

    torch.manual_seed(0)
    batch, vocab_size = shapes_batch(args.batch_size)
    image_tower = ImageTower("resnet18", channels_last=True)
    initial = DualEncoder(image_tower, TextTower(vocab_size, 256, 2, 4, 32), embed_dim=256)
    rates: dict[str, list[float]] = {"bare": [], "ours": []}
    for r in range(args.rounds):
        for name, fn in (("bare", run_bare), ("ours", run_ours)):
            seconds = fn(copy.deepcopy(initial), batch, args.steps, args.warmup, args.precision)
            rates[name].append(args.steps * args.batch_size / seconds)
            print(f"round {r + 1}/{args.rounds} {name:>4}: {rates[name][-1]:8.1f} samples/s", flush=True)
    ours, bare = statistics.median(rates["ours"]), statistics.median(rates["bare"])
    if not args.no_write:
        write_results(args, rates, ours, bare)
    print(
        f"median samples/s: ours {ours:.1f}, bare loop {bare:.1f}, ratio {ours / bare:.3f} (target >= 0.95)"
    )
    print(
        json.dumps(
            {
                "bench": "step_overhead",
                "batch_size": args.batch_size,
                "steps": args.steps,
                "rounds": args.rounds,
                "threads": torch.get_num_threads(),
                "precision": args.precision,
                "ours_samples_per_s": round(ours, 2),
                "bare_samples_per_s": round(bare, 2),
                "ratio": round(ours / bare, 4),
            }
        )
    )


def write_results(args, rates: dict[str, list[float]], ours: float, bare: float) -> None:
    rows = "\n".join(
        f"| {r + 1} | {rates['bare'][r]:.1f} | {rates['ours'][r]:.1f} |" for r in range(args.rounds)
    )
    body = (
        "## Training-step overhead\n\n"
        f"`python bench/step_overhead.py --batch-size {args.batch_size} --steps {args.steps} "
        f"--rounds {args.rounds}`: ResNet-18 + 2-layer text transformer, one real shapes batch of "
        f"{args.batch_size}, fused AdamW, channels_last, {args.precision}, "
        f"{torch.get_num_threads()} threads; "
        f"{args.steps} timed steps per round "
        f"after {args.warmup} warm-up steps, bare loop and ours interleaved.\n\n"
        "| round | bare PyTorch loop, samples/s | ours (Lightning + module + objective), samples/s |\n"
        "|---|---|---|\n"
        f"{rows}\n"
        f"| median | {bare:.1f} | {ours:.1f} |\n\n"
        f"Ratio ours / bare: **{ours / bare:.3f}** (target >= 0.95)."
    )
    text = RESULTS.read_text() if RESULTS.exists() else "# Results\n"
    RESULTS.write_text(replace_section(text, "step_overhead", body))


if __name__ == "__main__":
    main()
