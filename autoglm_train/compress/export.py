"""A trained (or compressed) dual encoder saved so that it loads without this package: two TorchScript
files (image and text encoder, normalized embeddings out), the tokenizer as HF ``tokenizers`` JSON (it
keeps its padding and truncation), and ``export.json`` with the preprocessing and sizes.

Loading needs torch and ``tokenizers`` only (see ``load_exported``, which imports nothing of ours).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from autoglm_train.utils.files import atomic_write_text

FORMAT_VERSION = 1


class _Encoder(nn.Module):
    """One tower and its projection: each exported file holds only its own weights."""

    def __init__(self, tower: nn.Module, proj: nn.Module):
        super().__init__()
        self.tower, self.proj = tower, proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.tower(x)), dim=-1)  # as DualEncoder.encode_image/text


@torch.no_grad()
def export_model(
    model, tokenizer, out_dir: str | Path, preprocess: dict, example_images: torch.Tensor
) -> Path:
    """Trace both encoders of ``model`` (float or quantized) into ``out_dir``; returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).eval()
    model.text_tower.trim_padding = False
    tokens = tokenizer(["a small red circle at the top left", "x"])
    image_encoder = _Encoder(model.image_tower, model.image_proj)
    image = torch.jit.trace(image_encoder, example_images[:2], check_trace=False)
    text = torch.jit.trace(_Encoder(model.text_tower, model.text_proj), tokens, check_trace=False)
    torch.jit.save(image, str(out / "image_encoder.pt"))
    torch.jit.save(text, str(out / "text_encoder.pt"))
    tokenizer.save(out / "tokenizer.json")
    meta = {
        "format": FORMAT_VERSION,
        "embed_dim": int(model.embed_dim),
        "context_length": int(tokenizer.context_length),
        "preprocess": preprocess,
    }
    atomic_write_text(out / "export.json", json.dumps(meta, indent=2))
    return out


def load_exported(path: str | Path) -> dict:
    """``{"image": ScriptModule, "text": ScriptModule, "tokenizer": tokenizers.Tokenizer, "meta": dict}``;
    imports torch and tokenizers only, so it runs where this package is not installed (copy it)."""
    from tokenizers import Tokenizer

    path = Path(path)
    return {
        "image": torch.jit.load(str(path / "image_encoder.pt")).eval(),
        "text": torch.jit.load(str(path / "text_encoder.pt")).eval(),
        "tokenizer": Tokenizer.from_file(str(path / "tokenizer.json")),
        "meta": json.loads((path / "export.json").read_text()),
    }
