"""What compression cost and bought: parameters, file size, FLOPs, CPU latency per batch and throughput
at batch 1 (all variants, PyTorch and ONNX Runtime, timed side by side, interleaved, median of repeats)
and retrieval, as a Markdown and JSON table; the token-merging family (image encoder alone, per r) as a
second table; and the pruning-ratio sweep as a plot."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from autoglm_train.compress.prune import estimate_flops


def count_flops(model, images: torch.Tensor, tokens: torch.Tensor) -> int:
    """FLOPs of one batch through both encoders (float models; quantized kernels are not counted)."""

    def both_encoders(images, tokens):
        model.encode_image(images)
        model.encode_text(tokens)

    return estimate_flops(model, (images, tokens), forward=both_encoders)


@torch.no_grad()
def measure_latency(
    variants: dict, images: torch.Tensor, tokens: torch.Tensor | None, repeats: int = 10
) -> dict:
    """Median seconds per batch (both encoders; the image encoder alone where ``tokens`` is None) of each
    variant, timed in interleaved rounds so that machine noise hits all alike; two warm-up rounds first."""
    for model in variants.values():
        model.eval()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(repeats + 2):
        for name, model in variants.items():
            start = time.perf_counter()
            model.encode_image(images)
            if tokens is not None:
                model.encode_text(tokens)
            if round_ >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def markdown_table(rows: list[dict], batch: int, baseline: str = "original") -> str:
    base = next(r for r in rows if r["variant"] == baseline)
    lines = [
        f"| variant | runtime | params (M) | file (MB) | GFLOPs / batch | CPU ms / batch of {batch} "
        f"| speed-up | samples/s at batch 1 | samples/s at batch {batch} | val/r1_mean | Δ r1 (points) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        flops = f"{r['flops'] / 1e9:.2f}" if r.get("flops") else "n/a (int8)"
        lines.append(
            f"| {r['variant']} | {r['runtime']} | {r['params'] / 1e6:.2f} | {r['file_bytes'] / 1e6:.1f} | "
            f"{flops} | {1000 * r['latency_s']:.1f} | {base['latency_s'] / r['latency_s']:.2f}x | "
            f"{r['throughput_b1']:.0f} | {r[f'throughput_b{batch}']:.0f} | "
            f"{r['val/r1_mean']:.4f} | {100 * (r['val/r1_mean'] - base['val/r1_mean']):+.1f} |"
        )
    return "\n".join(lines)


def token_merge_table(rows: list[dict], batch: int) -> str:
    """The token-merging family: per ``r`` and runtime, the image encoder's cost and speed (speed-up over
    r = 0 on the same runtime) and retrieval (Δ over r = 0 on the same runtime)."""
    lines = [
        f"| r | runtime | tokens at last block | image GFLOPs / batch | image CPU ms / batch of {batch} "
        f"| speed-up | images/s at batch 1 | images/s at batch {batch} | val/i2t_r1 | val/t2i_r1 "
        "| val/r1_mean | Δ r1 (points) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['r']} | {r['runtime']} | {r['tokens']} | {r['image_flops'] / 1e9:.2f} | "
            f"{1000 * r['latency_s']:.1f} | {r['speedup']:.2f}x | {r['throughput_b1']:.0f} | "
            f"{r[f'throughput_b{batch}']:.0f} | {r['val/i2t_r1']:.4f} | {r['val/t2i_r1']:.4f} | "
            f"{r['val/r1_mean']:.4f} | {100 * r['delta_r1_mean']:+.1f} |"
        )
    return "\n".join(lines)


def sweep_plot(points: list[dict], path: Path) -> Path:
    """val/r1_mean and speed-up against the pruning ratio, one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = [p["ratio"] for p in points]
    fig, left = plt.subplots(figsize=(6, 4))
    left.plot(ratios, [p["val/r1_mean"] for p in points], "o-", color="tab:blue", label="val/r1_mean")
    left.set_xlabel("pruning ratio (heads, MLP and conv channels removed)")
    left.set_ylabel("val/r1_mean", color="tab:blue")
    right = left.twinx()
    right.plot(ratios, [p["speedup"] for p in points], "s--", color="tab:red", label="CPU speed-up")
    right.set_ylabel("CPU speed-up vs original (fp32)", color="tab:red")
    left.set_title("Pruning sweep (each point: prune, then distilled fine-tune)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
