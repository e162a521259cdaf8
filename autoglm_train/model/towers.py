"""Image tower (any timm model) and text tower (a transformer encoder over token ids).

Every tower speaks one small protocol that the dual encoder, the optimizer and the launchers rely on:
``width`` (features out), ``lock(...)`` (LiT: freeze all but the last groups), ``set_grad_checkpointing``,
``layer_ids()`` (parameter name -> depth, for layer-wise learning-rate decay) and, for image towers,
``data_config`` (input size, mean, std, interpolation, crop_pct of the weights' preprocessing; with
``fixed_input_size: True`` when the tower takes that input size only, so the data must follow it).
"""

from __future__ import annotations

from pathlib import Path

import timm
import timm.data
import torch
from timm.layers import freeze_batch_norm_2d
from timm.models import group_modules, group_parameters
from timm.utils.model import freeze
from torch import nn
from torch.utils.checkpoint import checkpoint

from autoglm_train.model import timm_models  # noqa: F401  (registers our timm names)
from autoglm_train.model.fusion import grid_tokens
from autoglm_train.model.weights import check_timm_weights, load_into, read_state_dict, strip_prefix

# where a tower's weights sit inside checkpoints of ours and of common wrappers
IMAGE_PREFIXES = ("model.image_tower.backbone.", "image_tower.backbone.", "module.backbone.", "backbone.")


def trim_padding_columns(tokens: torch.Tensor) -> torch.Tensor:
    """Tokens without the trailing columns that are padding (id 0) in every row (right-padded rows)."""
    return tokens[:, : int((tokens != 0).sum(1).max().clamp(min=1))]


class LockableTower(nn.Module):
    """A tower that can be wholly locked (LiT): it then stays in eval mode (batch-norm statistics kept, no
    dropout, no patch dropout) and runs without autograd. Subclasses compute in ``_forward``."""

    locked = False
    # LoRA adapters inside (model/lora.py): a locked tower still stays in eval mode, but runs with autograd
    adapted = False

    def train(self, mode: bool = True):
        return super().train(mode and not self.locked)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.locked and not self.adapted:
            with torch.no_grad():
                return self._forward(inputs)
        return self._forward(inputs)

    def forward_tokens(self, inputs: torch.Tensor) -> tuple:
        """``(pooled, tokens, ...)``: the pooled features ``forward`` gives, and the per-token states of the
        same pass (for the fusion stage: model/fusion.py)."""
        if self.locked and not self.adapted:
            with torch.no_grad():
                return self._forward_tokens(inputs)
        return self._forward_tokens(inputs)


def timm_fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
    """``(height, width)`` where a timm model takes inputs of that size only, else None: models that embed
    patches with timm's ``PatchEmbed`` in strict mode (ViTs, DeiT, Swin, ... unless built with
    ``dynamic_img_size=True``), whose position embeddings are sized for one grid."""
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or not getattr(patch_embed, "strict_img_size", False):
        return None
    height, width = patch_embed.img_size
    return int(height), int(width)


def with_fixed_size(config: dict, size: tuple[int, int] | None) -> dict:
    """A ``data_config`` marked as the one input size the tower takes (when ``size`` is not None)."""
    if size is None:
        return config
    return {**config, "input_size": (3, *size), "fixed_input_size": True}


def check_image_weights(name: str, pretrained: bool, checkpoint: str | None) -> None:
    """The weights an image tower is asked to load are here: timm's release in the local cache (or
    downloadable), or an existing local file. Cheap: run before anything expensive."""
    if pretrained and checkpoint:
        raise ValueError("model.image_tower: give pretrained=true or checkpoint=PATH, not both")
    if pretrained:
        check_timm_weights(name)
    if checkpoint and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"model.image_tower.checkpoint={checkpoint}: file not found")


class ImageTower(LockableTower):
    """A timm backbone with its classifier removed; outputs pooled features of size ``width``.

    ``pretrained``: timm's released weights, from the local Hugging Face cache (or downloaded where the
    hub is reachable). ``checkpoint``: a local ``.safetensors``/``.pth``/``.bin`` file, or a checkpoint of
    ours (its image tower is taken); ``strict=false`` loads what matches and logs the rest.
    ``patch_dropout``: fraction of patch tokens dropped in training (ViT towers; timm's PatchDropout).
    ``channels_last``: weights and inputs in NHWC memory layout (convolutional towers run faster).
    """

    def __init__(
        self,
        name: str = "resnet18",
        pretrained: bool = False,
        checkpoint: str | None = None,
        strict: bool = True,
        patch_dropout: float = 0.0,
        channels_last: bool = False,
        **timm_kwargs,
    ):
        super().__init__()
        check_image_weights(name, pretrained, checkpoint)
        if not 0.0 <= patch_dropout < 1.0:
            raise ValueError(f"model.image_tower.patch_dropout must be in [0, 1), got {patch_dropout}")
        if patch_dropout:
            timm_kwargs["patch_drop_rate"] = patch_dropout
        self.name = name
        try:
            self.backbone = timm.create_model(name, pretrained=pretrained, num_classes=0, **timm_kwargs)
        except TypeError as exc:
            if patch_dropout and "patch_drop_rate" in str(exc):
                raise ValueError(
                    f"model.image_tower.patch_dropout needs a ViT-style tower; {name} has no patch tokens"
                ) from exc
            raise
        if checkpoint:
            state = strip_prefix(read_state_dict(checkpoint), IMAGE_PREFIXES)
            classifier = self.pretrained_cfg.get("classifier") or ()
            classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
            load_into(
                self.backbone,
                state,
                strict,
                f"model.image_tower.checkpoint={checkpoint}",
                ignore=[f"{c}." for c in classifier],
            )
        self.width = self.backbone.num_features
        # NHWC: convolutions run 1.4x faster on CPU (oneDNN) and use tensor cores best on GPU
        self.channels_last = channels_last
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)

    @property
    def pretrained_cfg(self) -> dict:
        return dict(getattr(self.backbone, "pretrained_cfg", {}) or {})

    @property
    def data_config(self) -> dict:
        """The preprocessing the weights expect (timm's resolution: input_size, mean, std, ...); a ViT's
        input size is the one its patch embedding was built for."""
        # from the backbone, whose pretrained_cfg may be gone (a quantized or traced copy): timm's defaults
        config = timm.data.resolve_data_config({}, model=self.backbone)
        return with_fixed_size(config, timm_fixed_input_size(self.backbone))

    def _groups(self) -> dict[int, list[str]]:
        return group_parameters(self.backbone, self.backbone.group_matcher(coarse=False))

    def lock(self, unlocked_groups: int = 0, freeze_bn: bool = False) -> None:
        """Freeze all but the last ``unlocked_groups`` groups of timm's layer grouping (stem, blocks or
        stages, head norm); ``freeze_bn`` also fixes batch-norm statistics of the frozen part."""
        groups = self._groups()
        last_frozen = max(groups) - unlocked_groups
        for gid, names in groups.items():
            if gid <= last_frozen:
                for n in names:
                    self.backbone.get_parameter(n).requires_grad_(False)
        self.locked = unlocked_groups <= 0
        if freeze_bn:
            if self.locked:
                self.backbone = freeze_batch_norm_2d(self.backbone)
            else:
                matcher = self.backbone.group_matcher(coarse=False)
                module_groups = group_modules(self.backbone, matcher, reverse=True)  # name -> group
                frozen = sorted(m for m, gid in module_groups.items() if gid <= last_frozen)
                freeze(self.backbone, frozen, include_bn_running_stats=True)  # BN -> FrozenBatchNorm2d

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def layer_ids(self) -> tuple[dict[str, int], int]:
        """``({parameter name: layer}, layers)`` from timm's grouping (names relative to this tower)."""
        groups = self._groups()
        ids = {f"backbone.{n}": gid for gid, names in groups.items() for n in names}
        return ids, max(groups)

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.backbone(images)

    def _forward_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pooled features, tokens [B, N, C])``: timm's ``forward_features`` (ViT tokens, or a feature
        map flattened with 2-D positions) and ``forward_head`` on it, one pass."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.backbone.forward_features(images)
        return self.backbone.forward_head(features, pre_logits=True), grid_tokens(features)


class TextTower(LockableTower):
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
        self.grad_checkpointing = False
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

    def lock(self, unlocked_layers: int = 0) -> None:
        """Freeze the embeddings and all but the last ``unlocked_layers`` layers (the final norm stays
        trainable with them)."""
        depth = len(self.encoder.layers)
        frozen = [self.token_embedding, *self.encoder.layers[: max(0, depth - unlocked_layers)]]
        if unlocked_layers <= 0:
            frozen.append(self.final_norm)
        for module in frozen:
            module.requires_grad_(False)
        self.positional_embedding.requires_grad_(unlocked_layers > depth)
        self.locked = unlocked_layers <= 0

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def layer_ids(self) -> tuple[dict[str, int], int]:
        depth = len(self.encoder.layers)
        ids = {}
        for name, _ in self.named_parameters():
            if name.startswith(("token_embedding", "positional_embedding")):
                ids[name] = 0
            elif name.startswith("encoder.layers."):
                ids[name] = int(name.split(".")[2]) + 1
            else:
                ids[name] = depth + 1
        return ids, depth + 1

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._pool(*self._states(tokens))

    def _forward_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(pooled, states [B, L, W], padding [B, L])``; L may be shorter than the input (trimmed)."""
        states, padding = self._states(tokens)
        return self._pool(states, padding), states, padding

    def _states(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"got {tokens.shape[1]} tokens, context_length is {self.context_length}")
        # drop the columns that are padding in every row: masked anyway, and they cost most of the compute.
        # Only on the host: on a GPU reading the length stalls the launch queue mid-step (the training
        # loader trims its batches on the host instead: ShardDataModule.attach(trim_text=True))
        if self.trim_padding and tokens.device.type == "cpu":
            tokens = trim_padding_columns(tokens)
        padding = tokens == 0
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            for layer in self.encoder.layers:  # keep one layer's activations at a time; recompute in backward
                x = checkpoint(layer, x, None, padding, use_reentrant=False)
        else:
            x = self.encoder(x, src_key_padding_mask=padding)
        return self.final_norm(x), padding

    def _pool(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        if self.pool == "cls":
            return x[:, 0]
        keep = (~padding).unsqueeze(-1).to(x.dtype)
        return (x * keep).sum(1) / keep.sum(1).clamp(min=1)
