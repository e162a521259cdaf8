"""Two towers + projection heads + a learnable temperature -> L2-normalized embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from autoglm_train.model.towers import ImageTower, TextTower


def projection(width: int, embed_dim: int, kind: str) -> nn.Module:
    if kind == "linear":
        return nn.Linear(width, embed_dim, bias=False)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, embed_dim, bias=False))
    raise ValueError(f"model.projection must be 'linear' or 'mlp', got {kind!r}")


class DualEncoder(nn.Module):
    """``forward(images, tokens) -> (image_emb, text_emb, logit_scale)``, embeddings unit-norm.

    The temperature is learned as a log logit scale (CLIP): initialized to log(1/init_temperature),
    applied as exp(.) clamped at ``max_logit_scale`` so it cannot run away.
    """

    def __init__(
        self,
        image_tower: ImageTower,
        text_tower: TextTower,
        embed_dim: int = 256,
        projection_kind: str = "linear",
        init_temperature: float = 0.07,
        learn_temperature: bool = True,
        max_logit_scale: float = 100.0,
    ):
        super().__init__()
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.image_proj = projection(image_tower.width, embed_dim, projection_kind)
        self.text_proj = projection(text_tower.width, embed_dim, projection_kind)
        self.embed_dim = embed_dim
        self.max_log_scale = math.log(max_logit_scale)
        # shape (1,), not a 0-dim scalar: PowerSGD's DDP hook views every gradient as a matrix
        self.log_logit_scale = nn.Parameter(
            torch.tensor([math.log(1.0 / init_temperature)]), requires_grad=learn_temperature
        )

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.image_tower(images)), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text_tower(tokens)), dim=-1)

    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale[0].clamp(max=self.max_log_scale).exp()

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        return self.encode_image(images), self.encode_text(tokens), self.logit_scale()

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Weight decay on matrices and conv kernels only; never on norms, biases, embeddings' scale."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim < 2 or name == "log_logit_scale" or "norm" in name or name.endswith(".bias"):
                no_decay.append(p)
            else:
                decay.append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
