"""open_clip models as a model family: both towers of an ``open_clip`` CLIP behind our tower protocol, and
the way back to open_clip's own checkpoint format.

``open_clip_model(name, pretrained)`` builds the CLIP with open_clip (released weights by tag from the
Hugging Face cache, a local weights file, or random init) and splits it into an image tower (``visual``)
and a text tower (the text half), which already project to the joint space: the dual encoder's heads are
identities and its temperature starts at the weights' own. ``export_open_clip_state_dict`` puts the
trained weights back under open_clip's key names, so ``open_clip.create_model(name, pretrained=FILE)``
loads them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.transformer import lock_text_tower
from timm.models import group_parameters
from torch import nn

from autoglm_train.model.dual_encoder import DualEncoder
from autoglm_train.model.towers import LockableTower, timm_fixed_input_size, with_fixed_size
from autoglm_train.model.weights import MissingWeightsError, ensure_hub_files

log = logging.getLogger(__name__)

CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")
# open_clip's file names on the hub: a safetensors twin is preferred over the pickle when both exist
HUB_DEFAULT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
PATH_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".npz")
# open_clip's resize modes as timm's eval crop modes (crop_pct 1.0: the crop is the whole resized side)
CROP_MODES = {"shortest": "center", "squash": "squash", "longest": "border"}
TAG_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode", "fill_color")
IMAGE_TOWER_KEYS = ("patch_dropout",)
TEXT_TOWER_KEYS = ("context_length", "vocab_size")


@dataclass(frozen=True)
class OpenCLIPSpec:
    """What the export needs to know about the open_clip model a dual encoder was built from."""

    name: str
    pretrained: str | None
    model_config: str | None
    force_quick_gelu: bool  # the weights were trained with QuickGELU that the architecture lacks
    logit_scale_shape: tuple[int, ...]


# --- architecture and weights ---------------------------------------------------------------------------
def register_model_config(name: str, model_config: str | os.PathLike | None) -> None:
    """Make ``model_config`` (an open_clip model-config JSON) known to open_clip under ``name``."""
    if model_config is None:
        return
    path = Path(model_config).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"model.model_config={model_config}: file not found")
    if path.stem != name:
        raise ValueError(
            f"model.model_config={model_config}: open_clip names an architecture by its config file, so "
            f"model.name must be {path.stem!r} (got {name!r})"
        )
    cfg = json.loads(path.read_text())
    missing = [k for k in CONFIG_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"model.model_config={model_config}: not an open_clip model config (no {missing})")
    if open_clip.get_model_config(name) != cfg:  # registering again would rescan every config each time
        open_clip.add_model_config(path)


def check_model_name(name: str) -> None:
    if name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(
            f"model.name={name!r}: hub and directory schemas are not supported; give an architecture "
            "name with model.pretrained=<weights file> (and model.model_config=<config json> if custom)"
        )
    if name not in open_clip.list_models():
        raise ValueError(
            f"model.name={name!r} is not an open_clip architecture; see open_clip.list_models() "
            "(e.g. ViT-B-16, ViT-B-32, ViT-L-14), or register one with model.model_config=PATH/<name>.json"
        )
    if "multimodal_cfg" in open_clip.get_model_config(name):
        raise ValueError(f"model.name={name!r} is a CoCa model; only contrastive CLIP models are supported")


def looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.startswith((".", "~")) or value.endswith(PATH_SUFFIXES)


def hub_filenames(filename: str) -> tuple[str, ...]:
    """The files open_clip tries for an ``hf_hub`` entry, in its order (safetensors first)."""
    if not filename:
        return HUB_DEFAULT_FILES
    if filename.endswith((".bin", ".pth")):
        return (filename[:-4] + ".safetensors", filename)
    return (filename,)


def ensure_tag_weights(name: str, tag: str, tag_cfg: Mapping) -> None:
    """The released weights of ``name``/``tag`` are here (or download), else ``MissingWeightsError``."""
    what = f"open_clip model {name!r} (model.pretrained={tag!r})"
    command = f"python -c \"import open_clip; open_clip.create_model('{name}', pretrained='{tag}')\""
    if tag_cfg.get("file"):
        if not Path(tag_cfg["file"]).is_file():
            raise MissingWeightsError(f"{what}: weights file {tag_cfg['file']} not found")
        return
    if tag_cfg.get("hf_hub"):  # 'org/repo/' (default file name) or 'org/repo/file', as open_clip splits it
        repo_id, filename = os.path.split(tag_cfg["hf_hub"])
        ensure_hub_files(repo_id, hub_filenames(filename), what, command)
        return
    cached = Path("~/.cache/clip").expanduser() / os.path.basename(tag_cfg["url"])  # open_clip's URL cache
    if not cached.is_file():
        raise MissingWeightsError(
            f"{what}: weights not found at {cached}. On a machine with network run `{command}` and copy "
            f"{cached.parent} here."
        )


def tag_config(name: str, pretrained: str | None) -> dict:
    """open_clip's release config of a tag (weights location, preprocessing, QuickGELU); {} otherwise."""
    return dict(open_clip.get_pretrained_cfg(name, pretrained)) if pretrained else {}


def check_open_clip_weights(
    name: str, pretrained: str | None, model_config: str | os.PathLike | None = None
) -> dict:
    """Raise unless open_clip can build ``name`` with ``pretrained`` from here, without a download that
    cannot happen: an unknown architecture or tag is a ``ValueError``, a missing local file a
    ``FileNotFoundError``, released weights absent from the Hugging Face cache a ``MissingWeightsError``.
    Returns the tag's open_clip pretrained config (``{}`` for a local file or no weights)."""
    register_model_config(name, model_config)
    check_model_name(name)
    if not pretrained:
        return {}
    tag_cfg = tag_config(name, pretrained)
    if tag_cfg:
        ensure_tag_weights(name, pretrained, tag_cfg)
        return tag_cfg
    if Path(pretrained).expanduser().is_file():
        return {}
    if looks_like_path(pretrained):
        raise FileNotFoundError(f"model.pretrained={pretrained}: weights file not found")
    tags = open_clip.list_pretrained_tags_by_model(name)
    raise ValueError(
        f"model.pretrained={pretrained!r} is neither a released tag of open_clip model {name!r} "
        f"(known: {', '.join(tags) or 'none'}) nor an existing weights file"
    )


# --- towers ---------------------------------------------------------------------------------------------
BLOCK_INDEX = re.compile(r"(?:^|\.)(?:resblocks|layers?|blocks)\.(\d+)\.")
RESNET_STAGE = re.compile(r"^layer(\d+)\.")  # ModifiedResNet's layer1..layer4


def layer_of(name: str, is_embedding: bool, depth: int) -> int:
    """Embeddings 0, block i -> i + 1, the rest (final norm, pooling, projection) depth + 1."""
    if is_embedding:
        return 0
    found = BLOCK_INDEX.search(name)
    if found:
        return int(found.group(1)) + 1
    stage = RESNET_STAGE.match(name)
    if stage:
        return int(stage.group(1))
    return depth + 1


def block_depth(names: list[str]) -> int:
    indices = [int(m.group(1)) + 1 for m in map(BLOCK_INDEX.search, names) if m]
    indices += [int(m.group(1)) for m in map(RESNET_STAGE.match, names) if m]
    return max(indices, default=0)


def depth_ids(
    module: nn.Module, prefix: str, is_embedding: Callable[[str], bool]
) -> tuple[dict[str, int], int]:
    names = [n for n, _ in module.named_parameters()]
    depth = block_depth(names)
    ids = {prefix + n: layer_of(n, is_embedding(n), depth) for n in names}
    return ids, depth + 1


def timm_trunk_ids(visual: nn.Module) -> tuple[dict[str, int], int]:
    """A timm trunk's own grouping (stem, blocks or stages, final norm); the head after it."""
    groups = group_parameters(visual.trunk, visual.trunk.group_matcher())
    last = max(groups) + 1
    ids = {f"visual.trunk.{n}": gid for gid, names in groups.items() for n in names}
    for n, _ in visual.named_parameters():
        ids.setdefault(f"visual.{n}", last)
    return ids, last


def trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


class OpenCLIPImageTower(LockableTower):
    """open_clip's ``visual`` (it pools and projects itself): ``forward`` = ``encode_image`` unnormalized.

    ``lock(unlocked_groups)`` is open_clip's: groups counted from the end as open_clip does (for a ViT:
    the projection, then the last block with the final norm, then each earlier block, the embeddings).
    """

    VIT_EMBEDDINGS = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "patch_dropout")
    RESNET_STEM = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")

    def __init__(self, visual: nn.Module, width: int, pretrained_cfg: Mapping | None = None):
        super().__init__()
        self.visual = visual
        self.width = width
        self._pretrained_cfg = dict(pretrained_cfg or {})

    @property
    def data_config(self) -> dict:
        """The weights' preprocessing in timm's resolved form (resize the shortest side, center crop)."""
        pp = dict(getattr(self.visual, "preprocess_cfg", None) or {})
        size = pp.get("size", getattr(self.visual, "image_size", 224))
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        resize_mode = pp.get("resize_mode", "shortest")
        if resize_mode not in ("shortest", "squash"):
            log.warning("open_clip resize_mode=%r has no timm equivalent; using a center crop", resize_mode)
        config = {
            "input_size": (3, int(height), int(width)),
            "interpolation": pp.get("interpolation", "bicubic"),
            "mean": tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN)),
            "std": tuple(pp.get("std", open_clip.OPENAI_DATASET_STD)),
            "crop_pct": 1.0,
            "crop_mode": CROP_MODES.get(resize_mode, "center"),
        }
        return with_fixed_size(config, self.fixed_input_size)

    @property
    def fixed_input_size(self) -> tuple[int, int] | None:
        """The one input size the tower takes: open_clip's ViT and ModifiedResNet add position embeddings
        of one grid (no interpolation); a timm trunk (``TimmModel``) follows timm's rule."""
        if hasattr(self.visual, "trunk"):
            return timm_fixed_input_size(self.visual.trunk)
        size = getattr(self.visual, "image_size", None)
        if size is None:
            return None
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return int(height), int(width)

    @property
    def pretrained_cfg(self) -> dict:
        """open_clip's release config of the weights, with the data keys timm reads from it."""
        return {**self._pretrained_cfg, **self.data_config}

    def lock(self, unlocked_groups: int = 0, freeze_bn: bool = False) -> None:
        try:
            self.visual.lock(unlocked_groups=unlocked_groups, freeze_bn_stats=freeze_bn)
        except AssertionError as exc:  # ModifiedResNet: all or nothing
            raise ValueError(f"model.lock_image_unlocked_groups={unlocked_groups}: {exc}") from exc
        self.locked = not trainable(self.visual)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)

    def layer_ids(self) -> tuple[dict[str, int], int]:
        if hasattr(self.visual, "trunk"):  # a timm backbone inside open_clip's TimmModel
            return timm_trunk_ids(self.visual)
        stem = self.VIT_EMBEDDINGS + self.RESNET_STEM
        return depth_ids(self.visual, "visual.", lambda n: n.split(".")[0] in stem)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.locked and hasattr(self.visual, "trunk") and not trainable(self.visual.trunk):
            self.visual.trunk.eval()  # a timm trunk locked under a trainable head: as our locked backbone
        return self

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)


class OpenCLIPTextTower(LockableTower):
    """The text half of an open_clip CLIP, without its image half: ``forward(tokens)`` is open_clip's own
    ``encode_text(tokens, normalize=False)``. For ``CLIP`` the text modules are registered here under
    open_clip's names (so the export is a rename-free copy); for ``CustomTextCLIP`` its ``text`` module.

    ``lock(unlocked_layers)`` counts transformer blocks, as our text tower does: the last
    ``unlocked_layers`` blocks train with the final norm and the projection (open_clip's
    ``lock_text_tower`` with one group more, its projection being a group of its own).
    """

    EMBEDDINGS = ("token_embedding", "positional_embedding", "cls_emb", "embeddings")

    def __init__(self, clip: nn.Module, width: int):
        super().__init__()
        self.width = width
        self.context_length = int(clip.context_length)
        self.vocab_size = int(clip.vocab_size)
        bias = getattr(clip, "logit_bias", None)
        if bias is not None:  # SigLIP-style models: kept (not trained here) so the export has it
            self.register_buffer("logit_bias", bias.detach().clone())
        if hasattr(clip, "text"):  # CustomTextCLIP: the text tower is one module already
            self.text = clip.text
            return
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.text_pool_type = clip.text_pool_type
        self.text_eos_id = getattr(clip, "text_eos_id", None)
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)

    @property
    def custom_text(self) -> bool:
        return hasattr(self, "text")

    def _open_clip_blocks(self) -> bool:
        """Whether the text is open_clip's own transformer (resblocks), which ``lock_text_tower`` groups."""
        owner = self.text if self.custom_text else self
        return hasattr(getattr(owner, "transformer", None), "resblocks")

    def lock(self, unlocked_layers: int = 0) -> None:
        if not self._open_clip_blocks():  # a Hugging Face text model: its own lock
            self.text.lock(unlocked_layers, freeze_layer_norm=True)
        else:
            lock_text_tower(self, self._open_clip_groups(unlocked_layers))
        self.locked = not trainable(self)

    def _open_clip_groups(self, unlocked_layers: int) -> int:
        """Blocks -> open_clip's groups: its last group is the projection alone, so count one more."""
        owner = self.text if self.custom_text else self
        has_projection = getattr(owner, "text_projection", None) is not None
        return unlocked_layers + 1 if unlocked_layers > 0 and has_projection else unlocked_layers

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if self.custom_text:
            self.text.set_grad_checkpointing(enable)
        else:
            self.transformer.grad_checkpointing = enable  # what open_clip's CLIP does

    def layer_ids(self) -> tuple[dict[str, int], int]:
        # embeddings by name at any depth: a Hugging Face model keeps them under transformer.embeddings
        def is_embedding(name: str) -> bool:
            return any(part in self.EMBEDDINGS for part in name.split("."))

        if self.custom_text:
            return depth_ids(self.text, "text.", is_embedding)
        return depth_ids(self, "", is_embedding)

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.custom_text:
            return self.text(tokens)
        if tokens.shape[1] != self.context_length:  # open_clip adds every positional embedding
            raise ValueError(
                f"got {tokens.shape[1]} tokens; open_clip's text tower needs {self.context_length}"
            )
        # open_clip's own code on the attributes it reads (token_embedding, ..., text_projection)
        return open_clip.model.CLIP.encode_text(self, tokens)


# --- the model ------------------------------------------------------------------------------------------
def tower_options(options: Mapping | None, known: tuple[str, ...], key: str) -> dict:
    options = dict(options or {})
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"model.{key}: unknown keys {unknown} (known: {list(known)})")
    return options


def check_text_options(text: dict, context_length: int, vocab_size: int) -> None:
    wanted = text.get("context_length")
    if wanted is not None and int(wanted) != context_length:
        raise ValueError(
            f"model.text_tower.context_length={wanted}, but the open_clip model's is {context_length}"
        )
    tokens = text.get("vocab_size")
    if tokens is not None and int(tokens) > vocab_size:
        raise ValueError(f"the tokenizer has {tokens} tokens; the open_clip text tower embeds {vocab_size}")


def wants_quick_gelu(name: str, tag_cfg: Mapping) -> bool:
    """Released weights trained with QuickGELU on an architecture without it: open_clip 3.x only warns
    and builds GELU, which changes the model, so ask for QuickGELU explicitly."""
    return bool(tag_cfg.get("quick_gelu")) and not open_clip.get_model_config(name).get("quick_gelu", False)


def create_clip(
    name: str, pretrained: str | None, tag_cfg: Mapping, load_weights: bool, patch_dropout: float
) -> nn.Module:
    kwargs = {"force_quick_gelu": wants_quick_gelu(name, tag_cfg)}
    if patch_dropout > 0:
        kwargs["force_patch_dropout"] = patch_dropout
    if not load_weights:  # the architecture and preprocessing of the weights, without reading them
        kwargs["force_preprocess_cfg"] = {k: v for k, v in tag_cfg.items() if k in TAG_PREPROCESS_KEYS}
        return open_clip.create_model(name, pretrained=None, **kwargs)
    if pretrained and Path(pretrained).expanduser().is_file():
        pretrained = str(Path(pretrained).expanduser())  # open_clip does not expand ~
    return open_clip.create_model(name, pretrained=pretrained, **kwargs)


def open_clip_model(
    name: str,
    pretrained: str | None = None,
    model_config: str | None = None,
    init_temperature: float | None = None,
    image_tower: Mapping | None = None,
    text_tower: Mapping | None = None,
    load_weights: bool = True,
    **options,
) -> DualEncoder:
    """A ``DualEncoder`` over open_clip model ``name`` (``pretrained``: a release tag, a weights file, or
    None for random init). ``init_temperature=None`` keeps the weights' own temperature; ``options`` go
    to ``DualEncoder`` as they are (``learn_temperature``, ``max_logit_scale``, the ``lock_*`` keys,
    ``grad_checkpointing``, ``compile``).
    ``load_weights=False`` builds what the weights need (QuickGELU, preprocessing of a tag) without
    reading or checking them: for a checkpoint of ours about to be loaded over it."""
    name = name.replace("/", "-")  # open_clip's spelling: ViT-B/16 -> ViT-B-16
    image = tower_options(image_tower, IMAGE_TOWER_KEYS, "image_tower")
    text = tower_options(text_tower, TEXT_TOWER_KEYS, "text_tower")
    patch_dropout = float(image.get("patch_dropout") or 0.0)
    if not 0.0 <= patch_dropout < 1.0:
        raise ValueError(f"model.image_tower.patch_dropout must be in [0, 1), got {patch_dropout}")
    if load_weights:
        tag_cfg = check_open_clip_weights(name, pretrained, model_config)
    else:
        register_model_config(name, model_config)
        check_model_name(name)
        tag_cfg = tag_config(name, pretrained)
    clip = create_clip(name, pretrained, tag_cfg, load_weights, patch_dropout)
    embed_dim = int(open_clip.get_model_config(name)["embed_dim"])
    check_text_options(text, int(clip.context_length), int(clip.vocab_size))

    log_scale = clip.logit_scale.detach().reshape(-1)[0].item()
    model = DualEncoder(
        OpenCLIPImageTower(clip.visual, embed_dim, tag_cfg),
        OpenCLIPTextTower(clip, embed_dim),
        embed_dim=embed_dim,
        projection_kind="none",
        init_temperature=init_temperature if init_temperature is not None else math.exp(-log_scale),
        **options,
    )
    if init_temperature is None:  # bit-exact, not through 1/exp(.)
        with torch.no_grad():
            model.log_logit_scale.copy_(clip.logit_scale.detach().reshape(1))
    model.open_clip_spec = OpenCLIPSpec(
        name=name,
        pretrained=pretrained,
        model_config=str(Path(model_config).expanduser().resolve()) if model_config else None,
        force_quick_gelu=wants_quick_gelu(name, tag_cfg),
        logit_scale_shape=tuple(clip.logit_scale.shape),
    )
    return model


# --- export ---------------------------------------------------------------------------------------------
def open_clip_spec(model: nn.Module) -> OpenCLIPSpec:
    spec = getattr(model, "open_clip_spec", None)
    if not isinstance(spec, OpenCLIPSpec):
        raise ValueError("the model was not built by open_clip_model (model=open_clip): no open_clip form")
    return spec


def export_open_clip_state_dict(model: DualEncoder, logit_bias: float | torch.Tensor | None = None) -> dict:
    """``model``'s weights under open_clip's key names (``visual.*``, the text keys, ``logit_scale``), on
    the CPU, for ``open_clip.create_model(name, pretrained=FILE)``. The logit scale is the one the model
    uses (clamped at its maximum). Where the architecture has a ``logit_bias`` (SigLIP-style), the one
    loaded with the weights is kept, unless ``logit_bias`` (a bias trained by our SigLIP loss) is given."""
    spec = open_clip_spec(model)
    state = {f"visual.{k}": v for k, v in model.image_tower.visual.state_dict().items()}
    state |= model.text_tower.state_dict()
    scale = model.log_logit_scale.detach()[0].clamp(max=model.max_log_scale)
    state["logit_scale"] = scale.reshape(spec.logit_scale_shape)
    if "logit_bias" in state and logit_bias is not None:
        state["logit_bias"] = torch.as_tensor(logit_bias, dtype=scale.dtype).reshape(
            state["logit_bias"].shape
        )
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}


def open_clip_load_call(spec: OpenCLIPSpec, path: str | os.PathLike) -> str:
    """The Python lines that load an exported file with open_clip alone."""
    lines = ["import open_clip"]
    if spec.model_config:
        lines.append(f"open_clip.add_model_config({spec.model_config!r})")
    extra = ", force_quick_gelu=True" if spec.force_quick_gelu else ""
    lines.append(
        f"model, _, preprocess = open_clip.create_model_and_transforms({spec.name!r}, "
        f"pretrained={str(path)!r}{extra})"
    )
    lines.append(f"tokenizer = open_clip.get_tokenizer({spec.name!r})")
    return "\n".join(lines)
