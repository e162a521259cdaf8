"""Two towers + projection heads + a learnable temperature -> L2-normalized embeddings."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from autoglm_train.model.fusion import FusionEncoder, TokenStates
from autoglm_train.model.lora import add_lora, lora_options

PROJECTIONS = ("linear", "lowrank", "mlp", "none")
# model.compile: false, true (= towers, what the flag meant before step existed), towers, step
COMPILE_MODES = ("towers", "step")


def compile_mode(value: bool | str | None) -> str | None:
    """``model.compile`` -> None (eager), ``"towers"`` (``torch.compile`` per tower) or ``"step"`` (the
    training step's forward and loss as one compiled function: lit/compiled_step.py); ``true`` is
    ``"towers"``."""
    if value is None or value is False:
        return None
    if value is True:
        return "towers"
    if value in COMPILE_MODES:
        return value
    raise ValueError(f"model.compile must be false, true (= towers), towers or step, got {value!r}")


class LowRankLinear(nn.Module):
    """``x -> up(down(x))``: a ``out x in`` projection as the product of ``out x rank`` and ``rank x in``
    factors, ``rank * (in + out)`` parameters instead of ``in * out``. Loading a state dict that holds a full
    ``weight`` (a checkpoint trained with a linear head) initialises the factors from its truncated SVD,
    the best rank-``rank`` approximation; at full rank the head is the same map."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(
                f"model.projection_rank must be in [1, {min(in_features, out_features)}] for a "
                f"{in_features} -> {out_features} head, got {rank}"
            )
        self.rank = rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @torch.no_grad()
    def factorize_(self, weight: torch.Tensor) -> None:
        """Set the factors to the truncated SVD of ``weight`` (``out x in``), the singular values split
        evenly between them."""
        u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
        root = s[: self.rank].sqrt()
        self.up.weight.copy_(u[:, : self.rank] * root)
        self.down.weight.copy_(root[:, None] * vh[: self.rank])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        full = state_dict.pop(prefix + "weight", None)
        if full is not None and prefix + "down.weight" not in state_dict:
            self.factorize_(full)
            state_dict[prefix + "down.weight"] = self.down.weight.detach().clone()
            state_dict[prefix + "up.weight"] = self.up.weight.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def energy_rank(weight: torch.Tensor, energy: float) -> int:
    """The smallest rank whose singular values keep ``energy`` of the squared Frobenius norm."""
    s2 = torch.linalg.svdvals(weight.double()) ** 2
    kept = torch.cumsum(s2, 0) / s2.sum()
    found = int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype)).item()) + 1
    return min(found, len(s2))  # energy 1 may sit a rounding error above the last cumulative share


def projection(width: int, embed_dim: int, kind: str, rank: int | None = None) -> nn.Module:
    if kind == "linear":
        return nn.Linear(width, embed_dim, bias=False)
    if kind == "lowrank":
        if rank is None:
            raise ValueError("model.projection_kind=lowrank needs model.projection_rank")
        return LowRankLinear(width, embed_dim, rank)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, embed_dim, bias=False))
    if kind == "none":  # the tower projects itself (open_clip towers)
        if width != embed_dim:
            raise ValueError(f"model.projection_kind=none needs tower width {width} == embed_dim {embed_dim}")
        return nn.Identity()
    raise ValueError(f"model.projection_kind must be one of {PROJECTIONS}, got {kind!r}")


class DualEncoder(nn.Module):
    """``forward(images, tokens) -> (image_emb, text_emb, logit_scale)``, embeddings unit-norm.

    The temperature is learned as a log logit scale (CLIP): initialized to log(1/init_temperature),
    applied as exp(.), never above ``max_logit_scale``. The trainer clamps the parameter itself after each
    optimizer step (``clamp_logit_scale_``, as CLIP and open_clip do); the forward only caps the value, its
    gradient passing as if uncapped, so a scale at the cap still learns (a plain ``clamp`` would give it no
    gradient: released CLIP weights sit exactly at log 100 and their temperature would never move).

    Locking (LiT): ``lock_image`` freezes the image tower but its last ``lock_image_unlocked_groups``
    groups (``lock_image_freeze_bn`` also fixes the frozen part's batch-norm statistics); ``lock_text``
    likewise with ``lock_text_unlocked_layers``. Frozen parameters have ``requires_grad=False``, so they
    stay out of the optimizer and out of DDP's reducer; a wholly locked tower runs in eval mode without
    autograd. ``grad_checkpointing`` recomputes tower activations in backward. ``compile``: ``true`` or
    ``"towers"`` wraps each tower's forward in ``torch.compile``; ``"step"`` leaves the model eager and marks
    it (``compile_mode``) for the LightningModule, which compiles the whole forward + loss of its training
    step (lit/compiled_step.py); either way the state dict keys are unchanged (no ``_orig_mod.``).
    ``cache_locked_features`` (a wholly locked image tower) marks the run for lit/feature_cache.py;
    ``encode_image`` then also takes the tower's features (2-D) in place of images (4-D).

    ``lora`` (``{"enabled", "rank", "alpha", "dropout", "targets": {"image", "text"}}``) puts LoRA adapters
    into the towers (model/lora.py) after locking: a tower with adapters trains only them (and what a lock
    left unlocked); heads and the temperature train as without. A wholly locked tower with adapters stays
    in eval mode (batch-norm statistics, no dropout) but runs with autograd, for its adapters.

    ``fusion`` (``{"layers": N, "heads": H}``, N > 0) adds the fusion stage (model/fusion.py):
    ``encode_tokens`` gives the embeddings together with both towers' token states, ``itm_logits`` scores
    (image, caption) pairs from them; with ``tower_grad: false`` those states are detached, so the itm
    term trains the fusion stage alone.
    """

    def __init__(
        self,
        image_tower: nn.Module,
        text_tower: nn.Module,
        embed_dim: int = 256,
        projection_kind: str = "linear",
        projection_rank: int | None = None,
        init_temperature: float = 0.07,
        learn_temperature: bool = True,
        max_logit_scale: float = 100.0,
        lock_image: bool = False,
        lock_image_unlocked_groups: int = 0,
        lock_image_freeze_bn: bool = False,
        lock_text: bool = False,
        lock_text_unlocked_layers: int = 0,
        grad_checkpointing: bool = False,
        compile: bool | str = False,
        cache_locked_features: bool = False,
        fusion: Mapping | None = None,
        lora: Mapping | None = None,
    ):
        super().__init__()
        if init_temperature <= 0:
            raise ValueError(f"model.init_temperature must be > 0, got {init_temperature}")
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.image_proj = projection(image_tower.width, embed_dim, projection_kind, projection_rank)
        self.text_proj = projection(text_tower.width, embed_dim, projection_kind, projection_rank)
        self.embed_dim = embed_dim
        self.max_log_scale = math.log(max_logit_scale)
        # shape (1,), not a 0-dim scalar: PowerSGD's DDP hook views every gradient as a matrix
        self.log_logit_scale = nn.Parameter(
            torch.tensor([math.log(1.0 / init_temperature)]), requires_grad=learn_temperature
        )
        if lock_image:
            self.image_tower.lock(lock_image_unlocked_groups, lock_image_freeze_bn)
        elif lock_image_unlocked_groups or lock_image_freeze_bn:
            raise ValueError(
                "model.lock_image_unlocked_groups/lock_image_freeze_bn need model.lock_image=true"
            )
        if cache_locked_features and not (lock_image and lock_image_unlocked_groups <= 0):
            raise ValueError(
                "model.cache_locked_features=true needs model.lock_image=true with no unlocked groups"
            )
        self.cache_locked_features = cache_locked_features
        if lock_text:
            self.text_tower.lock(lock_text_unlocked_layers)
        elif lock_text_unlocked_layers:
            raise ValueError("model.lock_text_unlocked_layers needs model.lock_text=true")
        self.lora_towers = self._add_lora(lora_options(lora), lock_image, lock_text)
        if cache_locked_features and "image" in self.lora_towers:
            raise ValueError(
                "model.cache_locked_features=true caches the image tower's output, which its LoRA adapters "
                "change every step: set model.lora.targets.image=[] or model.cache_locked_features=false"
            )
        if grad_checkpointing:
            self.image_tower.set_grad_checkpointing(True)
            self.text_tower.set_grad_checkpointing(True)
        fusion_layers, fusion_heads = (
            int((fusion or {}).get("layers") or 0),
            int((fusion or {}).get("heads", 4)),
        )
        self.fusion_lr_scale = float((fusion or {}).get("lr_scale", 1.0))
        self.fusion_tower_grad = bool((fusion or {}).get("tower_grad", True))
        if self.fusion_lr_scale <= 0:
            raise ValueError(f"model.fusion.lr_scale must be > 0, got {self.fusion_lr_scale}")
        self.fusion = None
        if fusion_layers:
            missing = [
                name
                for name, tower in (("image", image_tower), ("text", text_tower))
                if not hasattr(tower, "forward_tokens")
            ]
            if missing:
                raise ValueError(
                    f"model.fusion.layers={fusion_layers}: the {' and '.join(missing)} tower does not give "
                    "its token states (timm image towers and the text tower of ours do; open_clip and "
                    "Hugging Face towers not yet)"
                )
            if cache_locked_features:
                raise ValueError(
                    "model.fusion needs the image tower's token grid, which model.cache_locked_features=true "
                    "does not keep: set one of them off"
                )
            self.fusion = FusionEncoder(text_tower.width, image_tower.width, fusion_layers, fusion_heads)
            if grad_checkpointing:
                self.fusion.set_grad_checkpointing(True)
        self.compile_mode = compile_mode(compile)
        if self.compile_mode == "towers":  # nn.Module.compile: the module keeps its own state dict keys
            self.image_tower.compile()
            self.text_tower.compile()

    def _add_lora(self, options: dict | None, lock_image: bool, lock_text: bool) -> tuple[str, ...]:
        """Adapters into the towers ``options`` target; the towers that got some."""
        if options is None:
            return ()
        adapted = []
        for side, tower, locked in (
            ("image", self.image_tower, lock_image),
            ("text", self.text_tower, lock_text),
        ):
            targets = options["targets"][side]
            if targets is not None and len(targets) == 0:  # []: this tower trains (or locks) as configured
                continue
            count = add_lora(
                tower,
                targets,
                options["rank"],
                options["alpha"],
                options["dropout"],
                side,
                keep_trainable=locked,
            )
            if count:
                adapted.append(side)
        return tuple(adapted)

    # encode_image/encode_text are entry points of their own (FSDP registers them to gather the heads), so
    # forward calls the private twins: a registered method called inside forward would reshard too early
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self._encode_image(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._encode_text(tokens)

    def _encode_image(self, images: torch.Tensor) -> torch.Tensor:
        # a 2-D batch is the tower's features already (a locked tower's, from lit/feature_cache.py): images
        # are 4-D, so the two cannot be confused
        features = images if images.dim() == 2 else self.image_tower(images)
        return F.normalize(self.image_proj(features), dim=-1)

    def _encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text_tower(tokens)), dim=-1)

    def encode_tokens(self, images: torch.Tensor, tokens: torch.Tensor):
        """``(image_emb, text_emb, logit_scale, TokenStates)``: ``forward``'s outputs and, from the same
        pass, both towers' token states for the fusion stage."""
        image, image_tokens = self.encode_image_tokens(images)
        text, text_states, padding = self.encode_text_tokens(tokens)
        if not self.fusion_tower_grad:  # the itm term trains the fusion stage only
            image_tokens, text_states = image_tokens.detach(), text_states.detach()
        return image, text, self.logit_scale(), TokenStates(image_tokens, text_states, padding)

    def encode_image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embedding, token grid)`` of images, one pass."""
        features, image_tokens = self.image_tower.forward_tokens(images)
        return F.normalize(self.image_proj(features), dim=-1), image_tokens

    def encode_text_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(embedding, token states, padding mask)`` of captions, one pass."""
        features, states, padding = self.text_tower.forward_tokens(tokens)
        return F.normalize(self.text_proj(features), dim=-1), states, padding

    def itm_logits(self, image_tokens: torch.Tensor, text_states: torch.Tensor, text_padding: torch.Tensor):
        """The fusion stage's ITM logits [B, 2] of pairs (row i of each input is one pair)."""
        if self.fusion is None:
            raise ValueError("this model has no fusion stage (model.fusion.layers=0)")
        return self.fusion(image_tokens, text_states, text_padding)

    @property
    def text_trims_padding(self) -> bool:
        """Whether the text tower masks padding, so its batches may drop all-padding token columns."""
        return bool(getattr(self.text_tower, "trim_padding", False))

    def logit_scale(self) -> torch.Tensor:
        log_scale = self.log_logit_scale[0]
        # the capped value with the uncapped gradient (exactly log_scale wherever it is under the cap)
        capped = log_scale - (log_scale - log_scale.clamp(max=self.max_log_scale)).detach()
        return capped.exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Bring the parameter back under ``max_logit_scale``: called after every optimizer step."""
        self.log_logit_scale.clamp_(max=self.max_log_scale)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        return self._encode_image(images), self._encode_text(tokens), self.logit_scale()

    def lr_scales(self, image_layer_decay: float = 1.0, text_layer_decay: float = 1.0) -> dict[str, float]:
        """Layer-wise learning-rate decay (BEiT/ELECTRA): a tower parameter at depth l of L trains at
        ``decay ** (L - l)`` times the base rate; heads and the temperature at the full rate."""
        scales: dict[str, float] = {}
        for prefix, tower, decay in (
            ("image_tower.", self.image_tower, image_layer_decay),
            ("text_tower.", self.text_tower, text_layer_decay),
        ):
            if not 0.0 < decay <= 1.0:
                raise ValueError(f"optimizer.*_layer_decay must be in (0, 1], got {decay}")
            if decay == 1.0:
                continue
            ids, layers = tower.layer_ids()
            for name, layer in ids.items():
                scales[prefix + name] = decay ** (layers - layer)
        if self.fusion is not None and self.fusion_lr_scale != 1.0:  # a fresh stage on trained towers
            scales |= {f"fusion.{name}": self.fusion_lr_scale for name, _ in self.fusion.named_parameters()}
        return scales

    def param_groups(
        self, weight_decay: float, image_layer_decay: float = 1.0, text_layer_decay: float = 1.0
    ) -> list[dict]:
        """Weight decay on matrices and conv kernels only (never norms, biases, the logit scale); with a
        layer decay < 1, one group per (decay, lr_scale) pair. Frozen parameters are left out."""
        scales = self.lr_scales(image_layer_decay, text_layer_decay)
        groups: dict[tuple[bool, float], list] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            decayed = not (
                p.ndim < 2 or name == "log_logit_scale" or "norm" in name or name.endswith(".bias")
            )
            groups.setdefault((decayed, scales.get(name, 1.0)), []).append(p)
        for decayed in (True, False):  # the plain two groups always exist, in this order
            groups.setdefault((decayed, 1.0), [])
        ordered = sorted(groups.items(), key=lambda kv: (kv[0][1] != 1.0, not kv[0][0], -kv[0][1]))
        return [
            {"params": ps, "weight_decay": weight_decay if decayed else 0.0, "lr_scale": scale}
            for (decayed, scale), ps in ordered
        ]
