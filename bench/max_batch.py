"""The largest batch one GPU trains under DDP and under FSDP2, through our LightningModule and strategies:
a CLIP ViT-L/14 dual encoder (ViT-L/14 at 224 px, a 12-layer 768-wide text tower, 77 tokens, embed 768)
with gradient checkpointing, bf16 (DDP: ``bf16-mixed``; FSDP: its bf16 policy with fp32 reduction), AdamW.
On one rank FSDP shards nothing: the figure is its own overhead against DDP.

Search: the peak memory of a training step at two batch sizes gives memory = fixed + per_sample x batch;
the batch that fills ``--fill`` of the card is tried, then 10 % less until one fits. Samples/s are timed at
the batch found (``--steps`` steps after a warm-up step). One JSON line per strategy, then one with both.

    python bench/max_batch.py [--strategies ddp fsdp] [--image-model vit_large_patch14_224]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from functools import partial

import lightning as L
import torch

from autoglm_train.distributed.compression import CompressedDDPStrategy
from autoglm_train.distributed.fsdp import FSDP2Strategy
from autoglm_train.lit.module import DualEncoderModule
from autoglm_train.losses.infonce import InfoNCE
from autoglm_train.losses.objective import Objective
from autoglm_train.model.dual_encoder import DualEncoder
from autoglm_train.model.towers import ImageTower, TextTower

CONTEXT, VOCAB = 77, 49408


def make_module(args) -> DualEncoderModule:
    torch.manual_seed(0)
    model = DualEncoder(
        ImageTower(args.image_model, img_size=args.image_size, **args.image_kwargs),
        TextTower(VOCAB, args.text_width, args.text_depth, max(1, args.text_width // 64), CONTEXT),
        embed_dim=args.text_width,
        grad_checkpointing=True,
    )
    optimizer = partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.1, fused=True)
    return DualEncoderModule(model, Objective({"infonce": InfoNCE()}), optimizer=optimizer)


class Batches(torch.utils.data.IterableDataset):
    """The same random batch again and again, made on the GPU (no loader in the figure)."""

    def __init__(self, batch: int, steps: int, image_size: int, device: str):
        self.batch, self.steps, self.image_size, self.device = batch, steps, image_size, device

    def __iter__(self):
        g = torch.Generator(device=self.device).manual_seed(0)
        size = (self.batch, 3, self.image_size, self.image_size)
        image = torch.randn(size, device=self.device, generator=g)
        text = torch.randint(1, VOCAB, (self.batch, CONTEXT), device=self.device, generator=g)
        for _ in range(self.steps):
            yield {"image": image, "text": text}


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Clock(L.Callback):
    def __init__(self):
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        synchronize()
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module):
        synchronize()
        self.starts.append(time.perf_counter())


def strategy_of(name: str, device: str):
    backend = "nccl" if device == "cuda" else "gloo"
    if name == "ddp":
        return CompressedDDPStrategy(process_group_backend=backend), "bf16-mixed"
    return FSDP2Strategy(process_group_backend=backend, mixed_precision="bf16"), "32-true"


def train(args, name: str, batch: int, steps: int) -> tuple[bool, int, float]:
    """(fitted, peak bytes, samples/s over the steps after the first)."""
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    strategy, precision = strategy_of(name, args.device)
    clock = Clock()
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        strategy=strategy,
        precision=precision,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[clock],
    )
    loader = torch.utils.data.DataLoader(Batches(batch, steps, args.image_size, args.device), batch_size=None)
    try:
        trainer.fit(make_module(args), train_dataloaders=loader)
        fitted = True
    except torch.OutOfMemoryError:
        fitted = False
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    del trainer, loader
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    rate = float("nan")
    if fitted and len(clock.starts) > 2:
        rate = batch * (len(clock.starts) - 2) / (clock.starts[-1] - clock.starts[1])
    return fitted, peak, rate


def largest_batch(args, name: str) -> dict:
    small, large = args.probe
    if args.device == "cpu":  # a dry run of the harness: the probes train, nothing is searched
        fitted, _, rate = train(args, name, small, 1 + args.steps)
        return {
            "figure": "max_batch_dry_run",
            "strategy": name,
            "batch": small if fitted else None,
            "samples_per_s": rate,
        }
    capacity = torch.cuda.get_device_properties(0).total_memory * args.fill
    fits_small, peak_small, _ = train(args, name, small, 2)
    fits_large, peak_large, _ = train(args, name, large, 2)
    if not (fits_small and fits_large):
        raise RuntimeError(f"{name}: the probe batches {args.probe} do not fit")
    per_sample = (peak_large - peak_small) / (large - small)
    fixed = peak_small - per_sample * small
    batch = int((capacity - fixed) / per_sample) // args.multiple * args.multiple
    for _ in range(args.tries):
        fitted, peak, rate = train(args, name, batch, 1 + args.steps)
        if fitted:
            return {
                "figure": "max_batch",
                "strategy": name,
                "batch": batch,
                "samples_per_s": rate,
                "peak_gib": peak / 2**30,
                "fixed_gib": fixed / 2**30,
                "per_sample_mib": per_sample / 2**20,
            }
        batch = int(batch * 0.9) // args.multiple * args.multiple
    return {"figure": "max_batch", "strategy": name, "batch": None, "error": "no batch fitted"}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--strategies", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    parser.add_argument("--image-model", default="vit_large_patch14_224")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--text-width", type=int, default=768)
    parser.add_argument("--probe", type=int, nargs=2, default=[32, 96])
    parser.add_argument("--fill", type=float, default=0.92, help="fraction of the card's memory to plan for")
    parser.add_argument("--multiple", type=int, default=32)
    parser.add_argument("--tries", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--text-depth", type=int, default=12)
    parser.add_argument(
        "--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run (no search)"
    )
    parser.add_argument("--image-depth", type=int, default=None, help="fewer blocks (dry runs)")
    args = parser.parse_args()
    args.image_kwargs = {"depth": args.image_depth} if args.image_depth else {}
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    results = {}
    for name in args.strategies:
        results[name] = largest_batch(args, name)
        print(
            json.dumps({"bench": "max_batch", "image_model": args.image_model, **results[name]}), flush=True
        )
    summary = {"bench": "max_batch", "image_model": args.image_model, "figure": "max_batch_summary"}
    for name, r in results.items():
        summary[f"{name}_batch"], summary[f"{name}_samples_per_s"] = r.get("batch"), r.get("samples_per_s")
    if results.get("ddp", {}).get("batch") and results.get("fsdp", {}).get("batch"):
        summary["ratio"] = results["fsdp"]["batch"] / results["ddp"]["batch"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
