"""A trained (or pruned) dual encoder saved for serving on ONNX Runtime: two ONNX graphs (image and text
encoder, normalized embeddings out, dynamic batch), the tokenizer as HF ``tokenizers`` JSON (it keeps its
padding and truncation) and ``export.json`` with the preprocessing, sizes and input names.

Serving needs ``onnxruntime``, ``tokenizers`` and numpy only: neither torch nor this package
(``autoglm_train.compress.serving`` is the loader, and it imports neither at module level).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import shutil
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from autoglm_train.compress.serving import (
    FORMAT_VERSION,
    FUSION_FILES,
    IMAGE_FILE,
    META_FILE,
    TEXT_FILE,
    TOKENIZER_FILE,
)
from autoglm_train.model.lora import merge_
from autoglm_train.utils.files import atomic_write_text

OPSET = 18


class _Encoder(nn.Module):
    """One tower and its projection: each graph holds only its own weights."""

    def __init__(self, tower: nn.Module, proj: nn.Module):
        super().__init__()
        self.tower, self.proj = tower, proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.tower(x)), dim=-1)  # as DualEncoder.encode_image/text


class _ImageTokens(nn.Module):
    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tower.forward_tokens(images)[1]


class _TextStates(nn.Module):
    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tower.forward_tokens(tokens)[1]  # padding is tokens == 0: the caller has it


def export_fusion(model, out: Path, images: torch.Tensor, tokens: torch.Tensor) -> dict:
    """The fusion stage (model/fusion.py) as three graphs beside the encoders: images -> token grid, tokens
    -> token states, and (token grid, token states, padding) -> ITM logits; returns export.json's entry."""
    batch, sequence = (
        torch.export.Dim("batch", min=1),
        torch.export.Dim("sequence", min=1, max=int(tokens.shape[1])),
    )
    export_graph(_ImageTokens(model.image_tower), images, out / FUSION_FILES["image_tokens"], "images")
    export_graph(
        _TextStates(model.text_tower), tokens, out / FUSION_FILES["text_states"], "tokens", {1: sequence}
    )
    grid = model.image_tower.forward_tokens(images)[1]
    states = model.text_tower.forward_tokens(tokens)[1]
    padding = tokens == 0
    with (
        contextlib.redirect_stdout(io.StringIO()),
        _quiet("onnxscript", "torch.onnx", "onnx_ir"),
        warnings.catch_warnings(),
    ):
        warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape")
        torch.onnx.export(
            model.fusion.eval(),
            (grid, states, padding),
            str(out / FUSION_FILES["fusion"]),
            dynamo=True,
            input_names=["image_tokens", "text_states", "text_padding"],
            output_names=["itm_logits"],
            dynamic_shapes=({0: batch}, {0: batch, 1: sequence}, {0: batch, 1: sequence}),
            opset_version=OPSET,
            external_data=False,
            verbose=False,
        )
    return {
        "files": FUSION_FILES,
        "image_tokens": int(grid.shape[1]),
        "width": int(states.shape[2]),
        "logit_scale": float(model.logit_scale()),  # for itm+itc re-ranking: the similarity in logit units
    }


def export_graph(
    module: nn.Module, example: torch.Tensor, path: Path, input_name: str, dynamic: dict | None = None
) -> Path:
    """``module`` to one self-contained ONNX file (weights inside) by torch's exporter (``torch.export`` +
    onnxscript); the batch dimension is dynamic, and so are those ``dynamic`` maps to ``Dim`` s."""
    dynamic_shapes = {0: torch.export.Dim("batch", min=1), **(dynamic or {})}
    # the exporter narrates every pass on stdout; a failure still raises with its own message
    with contextlib.redirect_stdout(io.StringIO()), _quiet("onnxscript", "torch.onnx", "onnx_ir"):
        torch.onnx.export(
            module.eval(),
            (example,),
            str(path),
            dynamo=True,
            input_names=[input_name],
            output_names=["embeddings"],
            dynamic_shapes=(dynamic_shapes,),
            opset_version=OPSET,
            external_data=False,
            verbose=False,
        )
    return path


@contextlib.contextmanager
def _quiet(*loggers: str):
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


@torch.no_grad()
def export_model(
    model, tokenizer, out_dir: str | Path, preprocess: dict, example_images: torch.Tensor
) -> Path:
    """Both encoders of a float ``model`` as ONNX graphs in ``out_dir``, with the tokenizer and
    ``export.json``; returns ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = merge_(copy.deepcopy(model)).float().eval()  # LoRA adapters folded in: no adapter code served
    # trimming inside the graph would freeze the example's caption length into it: the caller trims (the
    # sequence dimension is dynamic, up to the context length)
    trims = model.text_trims_padding
    model.text_tower.trim_padding = False
    tokens = tokenizer(["a small red circle at the top left", "x"])
    images = example_images[:2].float().contiguous()
    export_graph(_Encoder(model.image_tower, model.image_proj), images, out / IMAGE_FILE, "images")
    sequence = {1: torch.export.Dim("sequence", min=1, max=int(tokens.shape[1]))}
    export_graph(_Encoder(model.text_tower, model.text_proj), tokens, out / TEXT_FILE, "tokens", sequence)
    fusion = export_fusion(model, out, images, tokens) if getattr(model, "fusion", None) is not None else None
    tokenizer.save(out / TOKENIZER_FILE)
    meta = {
        "format": FORMAT_VERSION,
        "precision": "fp32",
        "embed_dim": int(model.embed_dim),
        "context_length": int(tokenizer.context_length),
        "image_size": list(images.shape[1:]),
        "inputs": {"image": "images", "text": "tokens"},
        # token id 0 is padding, and columns of it may be dropped (the same embeddings, less compute)
        "trim_padding": bool(trims),
        "preprocess": preprocess,
    }
    if fusion:
        meta["fusion"] = fusion
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=2))
    return out


@torch.no_grad()
def export_image_variant(model, src: str | Path, out_dir: str | Path, example_images: torch.Tensor) -> Path:
    """An export beside ``src`` that differs in its image encoder only (``model`` 's: token merging, say):
    the image graph exported, the text graph, tokenizer, fusion graphs and ``export.json`` copied from
    ``src``; returns ``out_dir``."""
    src, out = Path(src), Path(out_dir)
    copy_sidecars(src, out, json.loads((src / META_FILE).read_text()))
    shutil.copyfile(src / TEXT_FILE, out / TEXT_FILE)
    model = merge_(copy.deepcopy(model)).float().eval()
    images = example_images[:2].float().contiguous()
    export_graph(_Encoder(model.image_tower, model.image_proj), images, out / IMAGE_FILE, "images")
    return out


def copy_sidecars(src: Path, dst: Path, meta: dict) -> None:
    """The tokenizer of the export in ``src`` next to another's graphs in ``dst``, with ``meta`` as its
    ``export.json``; the fusion stage's graphs too, as they are (fp32)."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / TOKENIZER_FILE, dst / TOKENIZER_FILE)
    if meta.get("fusion"):
        for name in meta["fusion"]["files"].values():
            shutil.copyfile(src / name, dst / name)
    atomic_write_text(dst / META_FILE, json.dumps(meta, indent=2))


def graphs_size(export_dir: Path) -> int:
    """Bytes of an export's graphs (weights included)."""
    return sum(p.stat().st_size for p in Path(export_dir).glob("*.onnx"))
