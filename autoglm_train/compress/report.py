"""What compression cost and bought: parameters, file size, FLOPs, CPU latency per batch and throughput
at batch 1 (all variants, PyTorch and ONNX Runtime, timed side by side, interleaved, median of repeats)
and retrieval, as a Markdown and JSON table; the token-merging family (image encoder alone, per r) as a
second table; and the pruning-ratio sweep as a plot."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from autoglm_train.compress.sensitivity import embedding_fidelity


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch counts the CUDA attention kernels but not the CPU one, which SDPA (ours, timm's, nn.MHA's) uses here
_EXTRA_FLOP_FORMULAS = (
    {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    else {}
)


def estimate_flops(
    model: nn.Module, example_inputs: Tensor | tuple, forward: Callable[..., object] | None = None
) -> int:
    """FLOPs of one forward on ``example_inputs`` (a tensor, or a tuple of positional arguments), counted by
    ``FlopCounterMode`` in eval mode without grad (mode restored; BatchNorm statistics untouched). Counts
    matmuls, convolutions and fused attention (the CPU kernel too); not norms or activations. ``forward``
    (default: ``model`` itself) is what runs on the inputs, e.g. both encoders of a dual encoder."""
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    flags = {m: m.training for m in model.modules()}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    # nn.MultiheadAttention's fused inference kernel has no FLOP formula (counts 0): use the plain path
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter:
            (forward or model)(*inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for module, training in flags.items():
            module.training = training
    return int(counter.get_total_flops())


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
    left.set_xlabel("pruning ratio (heads, MLP, conv channels and stem removed)")
    left.set_ylabel("val/r1_mean", color="tab:blue")
    right = left.twinx()
    right.plot(ratios, [p["speedup"] for p in points], "s--", color="tab:red", label="CPU speed-up")
    right.set_ylabel("CPU speed-up vs original (fp32)", color="tab:red")
    left.set_title("Pruning sweep (each point: prune, then distilled fine-tune)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@torch.no_grad()
def held_out_fidelity(reference, candidate, batches) -> dict:
    """Each tower's embeddings from ``candidate`` (an int8 graph) against ``reference`` (its fp32 graph)
    on held-out batches: ``{"image": {cosine, min_cosine, rel_error}, "text": ...}``."""
    out = {}
    for tower, key in (("image", "image"), ("text", "text")):
        encode = f"encode_{tower}"
        ref = torch.cat([getattr(reference, encode)(b[key]).float() for b in batches]).numpy()
        cand = torch.cat([getattr(candidate, encode)(b[key]).float() for b in batches]).numpy()
        out[tower] = embedding_fidelity(ref, cand)
    return out


def fidelity_tables(rows: list[dict], worst: int = 5) -> str:
    """Markdown: per int8 variant and graph, how it was quantized, the nodes kept fp32 and the final
    embeddings' cosine to fp32 on held-out data; then, where nodes were measured one at a time
    (``quantize.exclude=auto``), the ``worst`` most sensitive nodes of each graph."""
    int8 = [r for r in rows if r.get("fidelity")]
    if not int8:
        return ""
    lines = [
        "| variant | graph | mode | nodes kept fp32 | held-out cosine to fp32: mean / min | relative error |",
        "|---|---|---|---|---|---|",
    ]
    for r in int8:
        for graph in ("image", "text"):
            q, f = r["quantization"].get(graph, {}), r["fidelity"][graph]
            kept = f"{len(q.get('excluded', []))} of {q.get('nodes', 0)}"
            kept = "all" if q.get("mode") == "none" else kept
            lines.append(
                f"| {r['variant']} | {graph} | {q.get('mode', '?')} | {kept} | "
                f"{f['cosine']:.5f} / {f['min_cosine']:.5f} | {f['rel_error']:.4f} |"
            )
    measured = [
        (r, g) for r in int8 for g in ("image", "text") if r["quantization"].get(g, {}).get("effects")
    ]
    if measured:
        lines += [
            "",
            f"The {worst} most sensitive nodes of each graph, each quantized alone (calibration batches): "
            "cosine and relative error to fp32 of the node's output and of the final embedding.",
            "",
            "| variant | graph | node | op | output cosine | output rel. error | final cosine "
            "| final rel. error | kept fp32 |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r, graph in measured:
            q = r["quantization"][graph]
            for e in q["effects"][:worst]:
                lines.append(
                    f"| {r['variant']} | {graph} | `{e['node']}` | {e['op_type']} | "
                    f"{e['output_cosine']:.5f} | {e['output_rel_error']:.4f} | "
                    f"{e['final_cosine']:.5f} | {e['final_rel_error']:.4f} | "
                    f"{'yes' if e['node'] in q['excluded'] else 'no'} |"
                )
    return "\n".join(lines)
