"""The fusion stage (ALBEF/BLIP): text-side transformer layers that cross-attend to the image tower's token
grid, and an image-text matching (ITM) head that says whether an image and a caption belong together.

A dual encoder scores a pair by one dot product of two pooled vectors, so it cannot tell "a red circle
and a blue square" from "a blue circle and a red square"; here every word attends to every image region,
so it can. It costs one pass per (image, caption) pair, which is why it re-ranks the dual encoder's top-k
instead of ranking the whole gallery (eval/rerank.py).

Inputs are the towers' token states (``DualEncoder.encode_tokens``): the text tower's per-token outputs
with their padding mask, and the image tower's ``forward_features`` (ViT tokens; a CNN's feature map
flattened to one token per cell, with a fixed 2-D sine-cosine position added so a cell knows where it
is). The ITM logits are read at the first text position (the ``[CLS]`` token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TokenStates:
    """Per-token outputs of both towers for a batch: ``image`` [B, N, C_image], ``text`` [B, L, C_text],
    ``text_padding`` [B, L] (True at padding)."""

    image: torch.Tensor
    text: torch.Tensor
    text_padding: torch.Tensor


def grid_tokens(features: torch.Tensor) -> torch.Tensor:
    """``forward_features`` output as tokens [B, N, C]: a [B, C, H, W] map flattened with a 2-D sine-cosine
    position added (fixed, so any input size works); [B, N, C] tokens as they are."""
    if features.dim() == 3:
        return features
    b, c, h, w = features.shape
    return features.flatten(2).transpose(1, 2) + sincos_2d(h, w, c, features.device, features.dtype)


def sincos_2d(h: int, w: int, dim: int, device, dtype) -> torch.Tensor:
    """[H*W, dim] fixed positions: half the channels encode the row, half the column (MAE-style)."""
    quarter = dim // 4
    if quarter == 0:
        return torch.zeros(h * w, dim, device=device, dtype=dtype)
    freqs = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    rows, cols = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32),
        torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    parts = []
    for pos in (rows.flatten(), cols.flatten()):
        angles = pos[:, None] * freqs[None, :]
        parts += [angles.sin(), angles.cos()]
    out = torch.cat(parts, dim=1)
    return nn.functional.pad(out, (0, dim - out.shape[1])).to(dtype)


class FusionLayer(nn.Module):
    """Pre-norm: self-attention over the words (padding masked), cross-attention from the words to the
    image tokens, MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm_self, self.norm_cross, self.norm_mlp = (nn.LayerNorm(width) for _ in range(3))
        self.self_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, text: torch.Tensor, padding: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.norm_self(text)
        text = text + self.self_attn(x, x, x, key_padding_mask=padding, need_weights=False)[0]
        x = self.norm_cross(text)
        text = text + self.cross_attn(x, image, image, need_weights=False)[0]
        return text + self.mlp(self.norm_mlp(text))


class FusionEncoder(nn.Module):
    """``forward(image_tokens, text_states, text_padding) -> ITM logits [B, 2]`` (index 1: a match)."""

    def __init__(
        self,
        text_width: int,
        image_width: int,
        layers: int = 2,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        if layers < 1:
            raise ValueError(f"model.fusion.layers must be >= 1 to build a fusion encoder, got {layers}")
        if text_width % heads:
            raise ValueError(f"model.fusion.heads={heads} must divide the text tower's width {text_width}")
        self.image_in = nn.Linear(image_width, text_width)  # image tokens into the text's width
        self.image_norm = nn.LayerNorm(text_width)
        self.layers = nn.ModuleList(FusionLayer(text_width, heads, mlp_ratio, dropout) for _ in range(layers))
        self.final_norm = nn.LayerNorm(text_width)
        self.itm_head = nn.Linear(text_width, 2)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(
        self, image_tokens: torch.Tensor, text_states: torch.Tensor, text_padding: torch.Tensor
    ) -> torch.Tensor:
        image = self.image_norm(self.image_in(image_tokens))
        x = text_states
        for layer in self.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, text_padding, image, use_reentrant=False)
            else:
                x = layer(x, text_padding, image)
        return self.itm_head(self.final_norm(x[:, 0]))


def itm_score(logits: torch.Tensor) -> torch.Tensor:
    """A pair's match score from its ITM logits: the log-odds of a match (logit 1 - logit 0)."""
    return (logits[..., 1] - logits[..., 0]).float()
