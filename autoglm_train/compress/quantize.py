"""INT8 on the serving stack: an export's ONNX graphs quantized by ONNX Runtime.

    static   QDQ, int8 weights per output channel and uint8 activations whose ranges were observed on
             calibration batches from the training stream (what a convolutional tower wants: every conv
             runs on int8 inputs);
    dynamic  int8 weights, activations quantized on the fly per batch (no calibration; the usual choice
             for transformer matmuls, whose activation ranges move with the input).

Each graph first goes through ORT's quantization pre-processing (shape inference and graph fusions), so
that batch norms are folded and fused patterns are quantized as one.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from autoglm_train.compress import QUANT_MODES
from autoglm_train.compress.export import _quiet, copy_sidecars
from autoglm_train.compress.serving import IMAGE_FILE, TEXT_FILE, read_meta

MODES = QUANT_MODES


class _Batches(CalibrationDataReader):
    def __init__(self, input_name: str, batches: Iterable[np.ndarray]):
        self._feeds = iter([{input_name: b} for b in batches])

    def get_next(self):
        return next(self._feeds, None)


def quantize_graph(src: Path, dst: Path, mode: str, input_name: str, calibration: list[np.ndarray]) -> Path:
    """One graph to int8 (``mode`` static or dynamic; ``none`` copies it unchanged)."""
    if mode not in MODES:
        raise ValueError(f"quantization mode must be one of {MODES}, got {mode!r}")
    if mode == "none":
        dst.write_bytes(src.read_bytes())
        return dst
    with tempfile.TemporaryDirectory() as tmp, _quiet("root", "onnxruntime"):
        prepared = Path(tmp) / "prepared.onnx"
        # symbolic shape inference cannot follow the exporter's attention-mask Expand; ONNX's own can
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        if mode == "dynamic":
            quantize_dynamic(str(prepared), str(dst), weight_type=QuantType.QInt8)
        else:
            if not calibration:
                raise ValueError("static quantization needs at least one calibration batch")
            quantize_static(
                str(prepared),
                str(dst),
                _Batches(input_name, calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
    return dst


def quantize_export(
    src_dir: str | Path,
    dst_dir: str | Path,
    calibration_images: Iterable = (),
    calibration_tokens: Iterable = (),
    image_mode: str = "static",
    text_mode: str = "dynamic",
) -> Path:
    """An int8 copy of the export in ``src_dir`` at ``dst_dir``; calibration batches are tensors or arrays
    (images preprocessed as for the image graph, tokens as the tokenizer gives them)."""
    src, dst = Path(src_dir), Path(dst_dir)
    meta = read_meta(src)  # the graphs are read by the quantizer; no session needed
    dst.mkdir(parents=True, exist_ok=True)
    images = [_numpy(b, np.float32) for b in calibration_images]
    tokens = [_numpy(b, np.int64) for b in calibration_tokens]
    quantize_graph(src / IMAGE_FILE, dst / IMAGE_FILE, image_mode, meta["inputs"]["image"], images)
    quantize_graph(src / TEXT_FILE, dst / TEXT_FILE, text_mode, meta["inputs"]["text"], tokens)
    copy_sidecars(src, dst, {**meta, "precision": f"int8 (image {image_mode}, text {text_mode})"})
    return dst


def _numpy(batch, dtype) -> np.ndarray:
    if hasattr(batch, "detach"):  # a torch tensor
        batch = batch.detach().cpu().numpy()
    return np.ascontiguousarray(batch, dtype)
