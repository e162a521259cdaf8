"""Peak memory and time of one rank's InfoNCE loss (forward + backward) as the world size grows.

Ranks are simulated: the gathered batch of ``world x batch`` embeddings is made in this process, and
one rank's loss is computed the way we do it (its ``batch`` rows against the gathered ``world x batch``:
logits ``batch x world*batch``) and the way a naive port does it (every rank scores the whole gathered
batch against itself: ``world*batch x world*batch``). Both give the same gradient after DDP's average.

Memory is the rise of the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``)
over what was resident before the loss, after the inputs exist; on CUDA it is the allocator's peak.
Last line: one JSON object; ``ratio`` = growth of our memory / growth of the world size between the
smallest and largest world (1.0 = linear; the naive way approaches ``world`` growth squared).

    python bench/loss_memory.py [--batch 256] [--dim 512] [--worlds 1,2,4,8,16,32] [--repeats 3] [--no-write]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from autoglm_train.losses.infonce import infonce_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_comparison import RESULTS, replace_section  # noqa: E402

MiB = 2**20


class PeakMemory:
    """Bytes the process's peak rose by while the block ran (CPU: resident set; CUDA: allocator)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.libc = ctypes.CDLL("libc.so.6") if device.type == "cpu" else None

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} not in /proc/self/status")

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            self.libc.malloc_trim(0)  # hand freed blocks back, so the resident set is what lives now
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
            self.before = self._status("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.before
        else:
            self.peak = self._status("VmHWM") - self.before


def gathered_batch(world: int, batch: int, dim: int, device: torch.device):
    g = torch.Generator().manual_seed(world)
    image = F.normalize(torch.randn(world * batch, dim, generator=g), dim=-1).to(device).requires_grad_()
    text = F.normalize(torch.randn(world * batch, dim, generator=g), dim=-1).to(device).requires_grad_()
    return image, text


def one_rank(mode: str, image, text, batch: int, scale) -> None:
    if mode == "local_vs_global":  # ours: rank 0's rows against everything gathered
        loss = infonce_loss(image[:batch], text[:batch], image, text, scale, offset=0)
    else:  # naive: the whole gathered batch against itself on every rank
        loss = infonce_loss(image, text, image, text, scale, offset=0)
    loss.backward()


def measure(mode: str, world: int, batch: int, dim: int, repeats: int, device: torch.device) -> dict:
    image, text = gathered_batch(world, batch, dim, device)
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    one_rank(mode, image, text, batch, scale)  # warm-up: allocator pools and kernels
    peaks, times = [], []
    for _ in range(repeats):
        image.grad = text.grad = scale.grad = None
        with PeakMemory(device) as memory:
            start = time.perf_counter()
            one_rank(mode, image, text, batch, scale)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peaks.append(memory.peak)
    return {"peak_mib": statistics.median(peaks) / MiB, "ms": 1000 * statistics.median(times)}


def exponent(first: dict, last: dict, key: str, worlds: list[int]) -> float:
    return math.log(last[key] / first[key]) / math.log(worlds[-1] / worlds[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256, help="per-rank batch")
    parser.add_argument("--dim", type=int, default=512, help="embedding width")
    parser.add_argument("--worlds", default="1,2,4,8,16,32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/results.md alone")
    args = parser.parse_args()
    worlds = sorted(int(w) for w in args.worlds.split(","))
    device = torch.device(args.device)

    rows = {}
    for world in worlds:
        rows[world] = {
            mode: measure(mode, world, args.batch, args.dim, args.repeats, device)
            for mode in ("local_vs_global", "global_vs_global")
        }
        ours, naive = rows[world]["local_vs_global"], rows[world]["global_vs_global"]
        print(
            f"world {world:>3}: local-vs-global {ours['peak_mib']:8.1f} MiB {ours['ms']:8.1f} ms | "
            f"global-vs-global {naive['peak_mib']:8.1f} MiB {naive['ms']:8.1f} ms",
            file=sys.stderr,
            flush=True,
        )

    first, last = rows[worlds[0]], rows[worlds[-1]]
    growth = worlds[-1] / worlds[0]
    ours_growth = last["local_vs_global"]["peak_mib"] / first["local_vs_global"]["peak_mib"]
    naive_growth = last["global_vs_global"]["peak_mib"] / first["global_vs_global"]["peak_mib"]
    fit = {
        mode: {key: exponent(first[mode], last[mode], key, worlds) for key in ("peak_mib", "ms")}
        for mode in first
    }
    lines = [
        f"`python bench/loss_memory.py --batch {args.batch} --dim {args.dim} --worlds {args.worlds}` "
        f"({device.type}): one rank's InfoNCE forward + backward, {args.batch} rows per rank, "
        f"width {args.dim}, fp32; ranks simulated in one process. Peak memory is the rise of the peak "
        "resident set over what was resident before the loss (inputs excluded), median of "
        f"{args.repeats}.",
        "",
        "| world | local-vs-global MiB | global-vs-global MiB | local-vs-global ms | global-vs-global ms |",
        "|---|---|---|---|---|",
    ]
    for world, r in rows.items():
        lines.append(
            f"| {world} | {r['local_vs_global']['peak_mib']:.1f} | {r['global_vs_global']['peak_mib']:.1f} | "
            f"{r['local_vs_global']['ms']:.1f} | {r['global_vs_global']['ms']:.1f} |"
        )
    lines += [
        "",
        f"From world {worlds[0]} to {worlds[-1]} ({growth:.0f}x): local-vs-global memory grows "
        f"{ours_growth:.1f}x (exponent {fit['local_vs_global']['peak_mib']:.2f}; 1 = linear), "
        f"global-vs-global {naive_growth:.1f}x (exponent {fit['global_vs_global']['peak_mib']:.2f}). "
        f"Time exponents: {fit['local_vs_global']['ms']:.2f} vs {fit['global_vs_global']['ms']:.2f}.",
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        text = RESULTS.read_text()
        RESULTS.write_text(
            replace_section(text, "loss_memory", "## InfoNCE memory as the world grows\n\n" + table)
        )
    print(
        json.dumps(
            {
                "bench": "loss_memory",
                "device": device.type,
                "batch": args.batch,
                "dim": args.dim,
                "worlds": worlds,
                "local_vs_global_mib": [round(rows[w]["local_vs_global"]["peak_mib"], 1) for w in worlds],
                "global_vs_global_mib": [round(rows[w]["global_vs_global"]["peak_mib"], 1) for w in worlds],
                "memory_exponent_local_vs_global": round(fit["local_vs_global"]["peak_mib"], 3),
                "memory_exponent_global_vs_global": round(fit["global_vs_global"]["peak_mib"], 3),
                "ratio": round(ours_growth / growth, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
