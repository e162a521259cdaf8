"""Per-rank bytes of parameters + gradients + optimizer state: FSDP2 (``trainer=fsdp_cpu``) against DDP
(``trainer=ddp_cpu``), both through our LightningModule and strategies, on 2 gloo ranks, for a CLIP
ViT-B/16-sized dual encoder (ViT-B/16 at 224 px, a 12-layer 512-wide text tower, 77 tokens, embed 512).

Each rank trains two steps of AdamW at a batch of 2 per rank; at the second step the bytes each rank holds
are counted: its parameter tensors (a DTensor: its local shard), the gradients before the optimizer step,
and every optimizer state tensor after it. The target is FSDP <= 0.55x DDP (2 ranks shard to 0.5x, plus
what is not sharded). Last line: one JSON object with the figures and ``ratio``.

    python bench/fsdp_memory.py [--image-model vit_base_patch16_224] [--world 2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from functools import partial
from pathlib import Path

import lightning as L
import torch
import torch.multiprocessing as mp

from autoglm_train.distributed.compression import CompressedDDPStrategy
from autoglm_train.distributed.fsdp import FSDP2Strategy, local_tensor
from autoglm_train.lit.module import DualEncoderModule
from autoglm_train.losses.infonce import InfoNCE
from autoglm_train.losses.objective import Objective
from autoglm_train.model.dual_encoder import DualEncoder
from autoglm_train.model.towers import ImageTower, TextTower

BATCH, STEPS, CONTEXT, VOCAB = 2, 2, 77, 49408


def nbytes(tensors) -> int:
    return sum(local_tensor(t).numel() * t.element_size() for t in tensors if t is not None)


class CountBytes(L.Callback):
    def __init__(self):
        self.figures: dict[str, int] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == STEPS - 1:
            params = list(pl_module.model.parameters())
            self.figures["params"] = nbytes(params)
            self.figures["grads"] = nbytes(p.grad for p in params)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == STEPS:
            state = trainer.optimizers[0].state.values()
            self.figures["optimizer"] = nbytes(t for s in state for t in s.values() if torch.is_tensor(t))


def make_module(image_model: str, image_size: int) -> DualEncoderModule:
    torch.manual_seed(0)
    model = DualEncoder(
        ImageTower(image_model, img_size=image_size),
        TextTower(VOCAB, width=512, depth=12, heads=8, context_length=CONTEXT),
        embed_dim=512,
    )
    optimizer = partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.1)
    return DualEncoderModule(model, Objective({"infonce": InfoNCE()}), optimizer=optimizer)


def worker(rank: int, world: int, port: int, args, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    g = torch.Generator().manual_seed(rank)
    batches = [
        {
            "image": torch.randn(BATCH, 3, args.image_size, args.image_size, generator=g),
            "text": torch.randint(1, VOCAB, (BATCH, CONTEXT), generator=g),
        }
        for _ in range(STEPS)
    ]
    figures = {}
    strategies = {
        "ddp": lambda: CompressedDDPStrategy(process_group_backend="gloo"),
        "fsdp": lambda: FSDP2Strategy(process_group_backend="gloo"),
    }
    for name, strategy in strategies.items():
        count = CountBytes()
        trainer = L.Trainer(
            accelerator="cpu",
            devices=world,
            strategy=strategy(),
            max_steps=STEPS,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
            callbacks=[count],
        )
        loader = torch.utils.data.DataLoader(batches, batch_size=None)
        trainer.fit(make_module(args.image_model, args.image_size), train_dataloaders=loader)
        figures[name] = count.figures
    torch.save(figures, Path(out_dir) / f"rank{rank}.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--image-model", default="vit_base_patch16_224")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(worker, args=(args.world, free_port(), args, out), nprocs=args.world, join=True)
        ranks = [torch.load(Path(out) / f"rank{r}.pt") for r in range(args.world)]
    mib = 2**20
    print(f"{'':>6} {'rank':>4} {'params MiB':>11} {'grads MiB':>10} {'optimizer MiB':>14} {'total MiB':>10}")
    totals = {}
    for name in ("ddp", "fsdp"):
        per_rank = []
        for rank, figures in enumerate(ranks):
            f = figures[name]
            total = f["params"] + f["grads"] + f["optimizer"]
            per_rank.append(total)
            print(
                f"{name:>6} {rank:>4} {f['params'] / mib:>11.1f} {f['grads'] / mib:>10.1f} "
                f"{f['optimizer'] / mib:>14.1f} {total / mib:>10.1f}"
            )
        totals[name] = max(per_rank)  # the rank that holds the most decides what fits
    result = {
        "bench": "fsdp_memory",
        "image_model": args.image_model,
        "world": args.world,
        "parameters": ranks[0]["ddp"]["params"] // 4,
        "ddp_bytes_per_rank": totals["ddp"],
        "fsdp_bytes_per_rank": totals["fsdp"],
        "ratio": totals["fsdp"] / totals["ddp"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
