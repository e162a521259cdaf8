"""Which nodes int8 hurts, and how few to keep in fp32.

One node at a time: each node ONNX Runtime would quantize in a graph is quantized alone (the activation
ranges are observed once on the calibration batches and reused, so a node costs one graph rewrite and one
pass), and fp32 is compared with int8 on the selection batches for that node's own output and for the
final embedding (mean cosine and relative error). ``exclude_auto`` then keeps the most harmful nodes in
fp32, as few as bring the fully quantized graph's final embeddings to a mean cosine of ``min_cosine``
against fp32: quantized with none excluded, then 1, 2, 4, ... of the worst, then bisected.

Single-node effects do not add up exactly (errors compound through the graph), which is why each
candidate exclusion set is measured as a whole rather than predicted from the ranking.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry, QLinearOpsRegistry
from tqdm import tqdm

from autoglm_train.compress.serving import session

# what quantize_static (QDQ: its default op list is both registries, so Add and Softmax too) and
# quantize_dynamic (integer ops) rewrite; any other node is left fp32
QUANTIZED_OPS = {"static": set(QDQRegistry) | set(QLinearOpsRegistry), "dynamic": set(IntegerOpsRegistry)}
# ops that only move or reshape a tensor: quantized only where their input already is, they add no error
# of their own worth a measurement, and follow their neighbours' fate when those are kept fp32
LAYOUT_OPS = {"Flatten", "Pad", "Reshape", "Slice", "Split", "Squeeze", "Transpose", "Unsqueeze"}
# quantize_static's name for a quantized node's output after its Quantize/Dequantize pair
QDQ_OUTPUT = "{}_DequantizeLinear_Output"


def quantizable_nodes(model_path: Path, mode: str) -> list[onnx.NodeProto]:
    """The nodes of a (pre-processed) graph that ``mode`` quantizes and that compute (not ``LAYOUT_OPS``),
    named (a node is kept fp32 by its name)."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    ops = QUANTIZED_OPS[mode] - LAYOUT_OPS
    nodes = []
    for node in graph.node:
        if mode == "dynamic" and node.op_type == "Gemm" and node.name:
            # the dynamic quantizer first rewrites a Gemm as MatMul (+ Add), named after it: that MatMul is
            # what it quantizes and what nodes_to_exclude must name; the Gemm's output stays the result
            node = onnx.helper.make_node("MatMul", [], list(node.output), name=f"{node.name}_MatMul")
        if node.op_type in ops and node.name and node.output:
            nodes.append(node)
    return nodes


def embedding_fidelity(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Row-wise cosine and relative error of ``candidate`` against ``reference`` ``(N, ...)``: means,
    and the worst row's cosine."""
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    cand = candidate.reshape(len(candidate), -1).astype(np.float64)
    dot = (ref * cand).sum(1)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    cosine = np.where(norms > 0, dot / np.maximum(norms, 1e-30), 1.0)
    rel = np.linalg.norm(ref - cand, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-30)
    # a NaN or infinite row (a quantized -inf mask does that) is the worst, not "no norm to compare"
    broken = ~np.isfinite(cand).all(1)
    cosine, rel = np.where(broken, -1.0, cosine), np.where(broken, np.inf, rel)
    return {"cosine": float(cosine.mean()), "min_cosine": float(cosine.min()), "rel_error": float(rel.mean())}


def run_graph(model_path: Path, feeds: list[dict], extra_outputs: tuple[str, ...] = ()) -> list:
    """The graph's first output concatenated over ``feeds``, then each of ``extra_outputs`` as a list of
    one array per feed (an inner tensor need not be batch-first)."""
    if extra_outputs:
        model = onnx.load(str(model_path))
        model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in extra_outputs)
        sess = session(model.SerializeToString())
    else:
        sess = session(model_path)
    names = [sess.get_outputs()[0].name, *extra_outputs]
    results = [sess.run(names, feed) for feed in feeds]
    return [np.concatenate([r[0] for r in results]), *([r[i] for r in results] for i in range(1, len(names)))]


def node_effects(
    prepared: Path,
    mode: str,
    quantize: Callable[..., Path],
    feeds: list[dict],
    progress: bool = True,
) -> list[dict]:
    """Each quantizable node of ``prepared`` quantized alone (``quantize(dst, nodes_to_quantize=[name])``
    writes that graph), fp32 against int8 on ``feeds``: ``{node, op_type, output_cosine,
    output_rel_error, final_cosine, final_rel_error}``, the most harmful (lowest final cosine) first."""
    nodes = quantizable_nodes(prepared, mode)
    outputs = tuple(n.output[0] for n in nodes)
    reference, *node_refs = run_graph(prepared, feeds, outputs)
    effects = []
    with tempfile.TemporaryDirectory() as tmp:
        for node, node_ref in tqdm(
            list(zip(nodes, node_refs, strict=True)), desc=f"int8 sensitivity ({mode})", disable=not progress
        ):
            single = quantize(Path(tmp) / "single.onnx", nodes_to_quantize=[node.name])
            names = {o for n in onnx.load(str(single), load_external_data=False).graph.node for o in n.output}
            # static QDQ puts a Quantize/Dequantize pair after the node: what its consumers read
            probe = QDQ_OUTPUT.format(node.output[0])
            probe = probe if probe in names else node.output[0]
            final, node_out = run_graph(single, feeds, (probe,))
            # an inner tensor's fidelity: each batch's whole tensor as one vector, averaged over batches
            node_fid = embedding_fidelity(
                np.stack([r.ravel() for r in node_ref]), np.stack([o.ravel() for o in node_out])
            )
            final_fid = embedding_fidelity(reference, final)
            effects.append(
                {
                    "node": node.name,
                    "op_type": node.op_type,
                    "output_cosine": node_fid["cosine"],
                    "output_rel_error": node_fid["rel_error"],
                    "final_cosine": final_fid["cosine"],
                    "final_rel_error": final_fid["rel_error"],
                }
            )
    return sorted(effects, key=lambda e: (e["final_cosine"], -e["final_rel_error"]))


def exclude_auto(
    prepared: Path,
    dst: Path,
    quantize: Callable[..., Path],
    effects: list[dict],
    feeds: list[dict],
    min_cosine: float,
) -> dict:
    """The fewest of the most harmful nodes (``effects``' order) kept fp32 for the quantized graph's final
    embeddings to reach a mean cosine of ``min_cosine`` to fp32 on ``feeds``; that graph is left at
    ``dst``. ``{excluded, cosine, tried: [(count, cosine)], reached}``; when even all excluded does not
    reach the target (a graph with no quantizable node left), ``reached`` is false."""
    reference = run_graph(prepared, feeds)[0]
    order = [e["node"] for e in effects]
    tried: dict[int, float] = {}

    def cosine_with(count: int) -> float:
        if count not in tried:
            quantize(dst, nodes_to_exclude=order[:count])
            tried[count] = embedding_fidelity(reference, run_graph(dst, feeds)[0])["cosine"]
            last[0] = count
        return tried[count]

    last = [None]

    # none excluded, then 1, 2, 4, ... of the worst, all at last; then bisect the last step
    doubling = [0, *(2**i for i in range(max(len(order), 1).bit_length()) if 2**i < len(order)), len(order)]
    low, high = -1, len(order)  # low: the most that missed the target; high: the fewest that reached it
    for count in dict.fromkeys(doubling):
        if cosine_with(count) >= min_cosine:
            high = count
            break
        low = count
    while high - low > 1:
        mid = (low + high) // 2
        if cosine_with(mid) >= min_cosine:
            high = mid
        else:
            low = mid
    cosine_with(high)
    if last[0] != high:  # dst holds the last graph tried: write the chosen one
        quantize(dst, nodes_to_exclude=order[:high])
    reached = tried[high] >= min_cosine
    return {
        "excluded": order[:high],
        "cosine": tried[high],
        "tried": sorted(tried.items()),
        "reached": reached,
    }
