"""Image tower (any timm model) and text tower (a transformer encoder over token ids)."""

from __future__ import annotations

import timm
import torch
from torch import nn


class ImageTower(nn.Module):
    """A timm backbone with its classifier removed; outputs pooled features of size ``width``."""

    def __init__(self, name: str = "resnet18", pretrained: bool = False, **timm_kwargs):
        super().__init__()
        self.name = name
        self.backbone = timm.create_model(name, pretrained=pretrained, num_classes=0, **timm_kwargs)
        self.width = self.backbone.num_features

    @property
    def pretrained_cfg(self) -> dict:
        return dict(getattr(self.backbone, "pretrained_cfg", {}) or {})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)


class TextTower(nn.Module):
    """Pre-norm transformer encoder; pools the first ([CLS]) position or the mean of non-padding tokens.

    Token id 0 is padding and is masked out of attention.
    """

    def __init__(
        self,
        vocab_size: int,
        width: int = 256,
        depth: int = 2,
        heads: int = 4,
        context_length: int = 32,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        pool: str = "cls",
    ):
        super().__init__()
        if width % heads:
            raise ValueError(f"text_tower.width ({width}) must be divisible by text_tower.heads ({heads})")
        if pool not in ("cls", "mean"):
            raise ValueError(f"text_tower.pool must be 'cls' or 'mean', got {pool!r}")
        self.width, self.context_length, self.pool = width, context_length, pool
        # drop all-padding columns before the encoder (same output, less compute); off for tracing, which
        # would freeze the data-dependent length into the exported graph
        self.trim_padding = True
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        layer = nn.TransformerEncoderLayer(
            width,
            heads,
            dim_feedforward=int(width * mlp_ratio),
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"got {tokens.shape[1]} tokens, context_length is {self.context_length}")
        # drop the columns that are padding in every row: masked anyway, and they cost most of the compute
        if self.trim_padding:
            longest = int((tokens != 0).sum(1).max().clamp(min=1))
            tokens = tokens[:, :longest]
        padding = tokens == 0
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        x = self.final_norm(self.encoder(x, src_key_padding_mask=padding))
        if self.pool == "cls":
            return x[:, 0]
        keep = (~padding).unsqueeze(-1).to(x.dtype)
        return (x * keep).sum(1) / keep.sum(1).clamp(min=1)
