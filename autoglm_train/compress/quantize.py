"""INT8 on the serving stack: an export's ONNX graphs quantized by ONNX Runtime.

    static   QDQ, int8 weights per output channel and uint8 activations whose ranges were observed on
             calibration batches from the training stream (what a convolutional tower wants: every conv
             runs on int8 inputs);
    dynamic  int8 weights, activations quantized on the fly per batch (no calibration; the usual choice
             for transformer matmuls, whose activation ranges move with the input).

Each graph first goes through ORT's quantization pre-processing (shape inference and graph fusions), so
that batch norms are folded and fused patterns are quantized as one. Named nodes can be kept fp32
(``exclude``), or the most sensitive ones chosen by measurement (``exclude="auto"``: ``sensitivity``).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from autoglm_train.compress import QUANT_MODES, sensitivity
from autoglm_train.compress.export import _quiet, copy_sidecars
from autoglm_train.compress.serving import IMAGE_FILE, TEXT_FILE, read_meta
from autoglm_train.utils.files import atomic_write_text

MODES = QUANT_MODES
QUANTIZATION_FILE = "quantization.json"  # per graph: mode, nodes kept fp32 and, for auto, why


class _Batches(CalibrationDataReader):
    def __init__(self, input_name: str, batches: Iterable[np.ndarray]):
        self._feeds = iter([{input_name: b} for b in batches])

    def get_next(self):
        return next(self._feeds, None)


def _quantizer(prepared: Path, mode: str, input_name: str, calibration: list[np.ndarray], cache: Path):
    """``quantize(dst, nodes_to_quantize=None, nodes_to_exclude=None)`` for the pre-processed graph
    ``prepared``; static ranges are observed on ``calibration`` once (kept in ``cache``) and reused."""

    def quantize(dst: Path, nodes_to_quantize=None, nodes_to_exclude=None) -> Path:
        with _quiet("root", "onnxruntime"):
            if mode == "dynamic":
                quantize_dynamic(
                    str(prepared),
                    str(dst),
                    weight_type=QuantType.QInt8,
                    nodes_to_quantize=nodes_to_quantize,
                    nodes_to_exclude=nodes_to_exclude,
                )
            else:
                quantize_static(
                    str(prepared),
                    str(dst),
                    None if cache.is_file() else _Batches(input_name, calibration),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    nodes_to_quantize=nodes_to_quantize,
                    nodes_to_exclude=nodes_to_exclude,
                    calibration_cache_path=str(cache),
                )
        return dst

    return quantize


def quantize_graph(
    src: Path,
    dst: Path,
    mode: str,
    input_name: str,
    calibration: list[np.ndarray],
    exclude: str | Iterable[str] = (),
    min_cosine: float = 0.99,
    selection: list[np.ndarray] | None = None,
    progress: bool = False,
) -> dict:
    """One graph to int8 (``mode`` static or dynamic; ``none`` copies it unchanged), with the nodes named
    in ``exclude`` kept fp32, or with ``exclude="auto"`` the fewest most sensitive ones for the final
    embeddings to keep a mean cosine of ``min_cosine`` to fp32 on ``selection`` (default: the
    calibration batches). What was done: ``{mode, excluded, nodes}`` and, for auto, the per-node
    ``effects`` (``sensitivity.node_effects``), the ``selection_cosine`` reached and the counts ``tried``."""
    if mode not in MODES:
        raise ValueError(f"quantization mode must be one of {MODES}, got {mode!r}")
    if mode == "none":
        dst.write_bytes(src.read_bytes())
        return {"mode": mode, "excluded": [], "nodes": 0}
    if mode == "static" and not calibration:
        raise ValueError("static quantization needs at least one calibration batch")
    with tempfile.TemporaryDirectory() as tmp, _quiet("root", "onnxruntime"):
        prepared = Path(tmp) / "prepared.onnx"
        # symbolic shape inference cannot follow the exporter's attention-mask Expand; ONNX's own can
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        quantize = _quantizer(prepared, mode, input_name, calibration, Path(tmp) / "ranges.json")
        nodes = [n.name for n in sensitivity.quantizable_nodes(prepared, mode)]
        if exclude != "auto":  # names not in this graph may be in the other one: the caller checks
            present = {n.name for n in onnx.load(str(prepared), load_external_data=False).graph.node}
            present |= set(nodes)  # a Gemm is named as the MatMul the dynamic quantizer makes of it
            excluded = [n for n in exclude if n in present]
            quantize(dst, nodes_to_exclude=excluded or None)
            return {"mode": mode, "excluded": excluded, "nodes": len(nodes)}
        feeds = [{input_name: b} for b in (selection or calibration)]
        effects = sensitivity.node_effects(prepared, mode, quantize, feeds, progress)
        chosen = sensitivity.exclude_auto(prepared, dst, quantize, effects, feeds, min_cosine)
    return {
        "mode": mode,
        "excluded": chosen["excluded"],
        "nodes": len(nodes),
        "min_cosine": min_cosine,
        "selection_cosine": chosen["cosine"],
        "reached": chosen["reached"],
        "tried": chosen["tried"],
        "effects": effects,
    }


def quantize_export(
    src_dir: str | Path,
    dst_dir: str | Path,
    calibration_images: Iterable = (),
    calibration_tokens: Iterable = (),
    image_mode: str = "static",
    text_mode: str = "dynamic",
    exclude: str | Iterable[str] = (),
    min_cosine: float = 0.99,
    selection_batches: int | None = None,
    progress: bool = False,
) -> Path:
    """An int8 copy of the export in ``src_dir`` at ``dst_dir``; calibration batches are tensors or arrays
    (images preprocessed as for the image graph, tokens as the tokenizer gives them). ``exclude``: names of
    nodes kept fp32 (each in whichever graph holds it), or ``"auto"`` (``quantize_graph``, choosing on the
    first ``selection_batches`` calibration batches). What each graph's quantization did is kept beside
    the graphs in ``quantization.json``."""
    src, dst = Path(src_dir), Path(dst_dir)
    meta = read_meta(src)  # the graphs are read by the quantizer; no session needed
    dst.mkdir(parents=True, exist_ok=True)
    exclude = exclude if exclude == "auto" else list(exclude)
    images = [_numpy(b, np.float32) for b in calibration_images]
    tokens = [_numpy(b, np.int64) for b in calibration_tokens]
    done = {}
    for graph, file, mode, batches in (
        ("image", IMAGE_FILE, image_mode, images),
        ("text", TEXT_FILE, text_mode, tokens),
    ):
        done[graph] = quantize_graph(
            src / file,
            dst / file,
            mode,
            meta["inputs"][graph],
            batches,
            exclude,
            min_cosine,
            batches[:selection_batches] if selection_batches else None,
            progress=progress,
        )
    if exclude != "auto":
        unknown = sorted(set(exclude) - {n for d in done.values() for n in d["excluded"]})
        if unknown:  # names are those of quantization.json's effects: the graphs after pre-processing
            raise ValueError(
                f"quantize.exclude: no node named {unknown} in either graph of {src} (after ONNX Runtime's "
                "pre-processing; quantize.exclude=auto lists each graph's nodes in quantization.json)"
            )
    atomic_write_text(dst / QUANTIZATION_FILE, json.dumps(done, indent=1))
    kept = {g: len(d["excluded"]) for g, d in done.items() if d["excluded"]}
    precision = f"int8 (image {image_mode}, text {text_mode}" + "".join(
        f"; {n} {g} nodes fp32" for g, n in kept.items()
    )
    copy_sidecars(src, dst, {**meta, "precision": precision + ")"})
    return dst


def read_quantization(export_dir: str | Path) -> dict:
    """What ``quantize_export`` did to each graph of an int8 export (``{}`` for a float one)."""
    path = Path(export_dir) / QUANTIZATION_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _numpy(batch, dtype) -> np.ndarray:
    if hasattr(batch, "detach"):  # a torch tensor
        batch = batch.detach().cpu().numpy()
    return np.ascontiguousarray(batch, dtype)
