"""An export directory (``compress.export``) loaded on ONNX Runtime: the two encoders, the tokenizer and
the metadata. Imports onnxruntime, tokenizers and numpy only, so it is what a service copies; the one
torch-facing piece, ``OrtDualEncoder`` (the same ``encode_image``/``encode_text`` as a ``DualEncoder``, for
evaluation and timing beside PyTorch models), imports torch when it is built.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

IMAGE_FILE, TEXT_FILE, META_FILE, TOKENIZER_FILE = (
    "image_encoder.onnx",
    "text_encoder.onnx",
    "export.json",
    "tokenizer.json",
)
FORMAT_VERSION = 2  # 1 was TorchScript (image_encoder.pt / text_encoder.pt)
# a model with a fusion stage (model/fusion.py) exports it too: export.json's "fusion" names these
FUSION_FILES = {
    "image_tokens": "image_tokens.onnx",
    "text_states": "text_states.onnx",
    "fusion": "fusion.onnx",
}


def session(path: Path | bytes, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # one process's worth of cores, as PyTorch has; ORT's default also spins idle threads that steal
    # the cores other work on a shared machine needs
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    model = path if isinstance(path, bytes) else str(path)  # a serialized graph, or its file
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


@dataclass
class Exported:
    image: ort.InferenceSession
    text: ort.InferenceSession
    tokenizer: Tokenizer
    meta: dict
    path: Path
    threads: int | None = None

    def encode_image(self, images: np.ndarray) -> np.ndarray:
        """Preprocessed images ``(N, C, H, W)`` float32 -> unit embeddings ``(N, D)``."""
        return self.image.run(None, {self.meta["inputs"]["image"]: np.ascontiguousarray(images, np.float32)})[
            0
        ]

    def tokenize(self, texts: list[str]) -> np.ndarray:
        return np.array([e.ids for e in self.tokenizer.encode_batch(list(texts))], dtype=np.int64)

    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        if self.meta.get("trim_padding"):
            tokens = trim_padding_columns(tokens)
        return self.text.run(None, {self.meta["inputs"]["text"]: np.ascontiguousarray(tokens, np.int64)})[0]

    def encode_text(self, texts: list[str]) -> np.ndarray:
        return self.encode_tokens(self.tokenize(texts))

    @property
    def has_fusion(self) -> bool:
        return bool(self.meta.get("fusion"))

    def _fusion_session(self, part: str) -> ort.InferenceSession:
        if not self.has_fusion:
            raise ValueError(
                f"{self.path}: this export has no fusion stage (trained with model.fusion.layers=0)"
            )
        cache = self.__dict__.setdefault("_fusion", {})
        if part not in cache:
            cache[part] = session(self.path / self.meta["fusion"]["files"][part], self.threads)
        return cache[part]

    def image_tokens(self, images: np.ndarray) -> np.ndarray:
        """Preprocessed images -> the image tower's token grid ``(N, T, C)`` for the fusion stage."""
        return self._fusion_session("image_tokens").run(
            None, {"images": np.ascontiguousarray(images, np.float32)}
        )[0]

    def text_states(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token ids -> ``(token states (N, L, W), padding (N, L))`` for the fusion stage."""
        tokens = trim_padding_columns(tokens) if self.meta.get("trim_padding") else tokens
        states = self._fusion_session("text_states").run(
            None, {"tokens": np.ascontiguousarray(tokens, np.int64)}
        )[0]
        return states, tokens == 0

    def itm_logits(
        self, image_tokens: np.ndarray, text_states: np.ndarray, padding: np.ndarray
    ) -> np.ndarray:
        """The fusion stage's ITM logits ``(N, 2)`` of pairs (row i of each input is one pair)."""
        feeds = {
            "image_tokens": np.ascontiguousarray(image_tokens, np.float32),
            "text_states": np.ascontiguousarray(text_states, np.float32),
            "text_padding": np.ascontiguousarray(padding, np.bool_),
        }
        return self._fusion_session("fusion").run(None, feeds)[0]


def trim_padding_columns(tokens: np.ndarray) -> np.ndarray:
    """Drop the trailing columns that are padding (id 0) in every row (right-padded rows), as the text
    tower does before its encoder; at least one column stays."""
    return tokens[:, : max(1, int((tokens != 0).sum(1).max(initial=0)))]


def read_meta(path: str | Path) -> dict:
    """An export's ``export.json``, checked to be one this version reads."""
    path = Path(path)
    if not (path / META_FILE).is_file():
        old = (
            " (a TorchScript export of format 1: export it again)"
            if (path / "image_encoder.pt").exists()
            else ""
        )
        raise FileNotFoundError(f"{path}: no {META_FILE} there: not an export directory{old}")
    meta = json.loads((path / META_FILE).read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: export format {meta.get('format')}, this version reads {FORMAT_VERSION} (ONNX); "
            "export the checkpoint again with python -m autoglm_train.compress"
        )
    return meta


def load_exported(path: str | Path, threads: int | None = None) -> Exported:
    path = Path(path)
    meta = read_meta(path)
    return Exported(
        session(path / IMAGE_FILE, threads),
        session(path / TEXT_FILE, threads),
        Tokenizer.from_file(str(path / TOKENIZER_FILE)),
        meta,
        path,
        threads,
    )


class OrtDualEncoder:
    """An export behind a ``DualEncoder``'s encode methods (torch tensors in and out), so evaluation and
    latency code serve PyTorch and ONNX Runtime variants alike."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import torch

        self._torch = torch
        self.exported = load_exported(path, threads or torch.get_num_threads())

    def eval(self):
        return self

    def encode_image(self, images):
        return self._torch.from_numpy(self.exported.encode_image(images.float().cpu().numpy()))

    def encode_text(self, tokens):
        return self._torch.from_numpy(self.exported.encode_tokens(tokens.cpu().numpy()))
