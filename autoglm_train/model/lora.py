"""LoRA adapters on a tower, through Hugging Face ``peft`` (``inject_adapter_in_model`` + ``LoraConfig``).

Adapters go into the tower in place: each targeted ``nn.Linear``/``nn.Conv2d`` becomes peft's LoRA layer
(the original module as its ``base_layer``, ``W x + (alpha / rank) B A x``), so the state dict keys change
(``...qkv.base_layer.weight``, ``...qkv.lora_A.default.weight``) and a checkpoint rebuilt from the same
config loads strictly. The tower's base weights are frozen; parameters a lock left trainable (LiT's
unlocked groups) stay so. ``merged`` folds the adapters into the base weights and gives back a plain
model with no adapter module (what export, compress and ``export_open_clip`` work on).

Targets are glob patterns over module names inside the tower (``fnmatch``: ``*`` crosses dots), expanded
here to the exact names peft receives, so a pattern that matches nothing is an error, not a silent no-op.
``nn.MultiheadAttention`` (our text tower, open_clip's blocks) reads its ``out_proj.weight`` directly and
never calls the module, so an adapter there would be skipped: refused. Its fused input projection is a bare
parameter that only peft's experimental MHA wrapper can adapt; the defaults for those towers take the MLP
linears instead.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Mapping, Sequence

import torch
from torch import nn

TOWERS = ("image", "text")

# tried in order; the first set that matches any module of the tower is its default
DEFAULT_TARGETS: tuple[tuple[str, ...], ...] = (
    ("*blocks.*.attn.qkv", "*blocks.*.attn.proj"),  # timm ViTs (and DeiT, EVA, ...)
    ("*resblocks.*.mlp.c_fc", "*resblocks.*.mlp.c_proj"),  # open_clip transformers (image and text)
    ("encoder.layers.*.linear1", "encoder.layers.*.linear2"),  # our text transformer
    ("*layer?.*.conv?",),  # timm ResNets (and ours: resnet18_narrow): the convolutions of every block
)


def hf_default_targets(tower: nn.Module) -> tuple[str, ...] | None:
    """peft's own defaults for a Hugging Face model type (BERT: ``query``, ``value``)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as BY_TYPE

    config = getattr(getattr(tower, "model", None), "config", None)
    names = BY_TYPE.get(getattr(config, "model_type", None))
    return tuple(f"*.{n}" for n in names) if names else None


def default_targets(tower: nn.Module) -> tuple[str, ...]:
    hf = hf_default_targets(tower)
    if hf:
        return hf
    names = [n for n, _ in tower.named_modules()]
    for patterns in DEFAULT_TARGETS:
        if any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns):
            return patterns
    raise ValueError(
        f"model.lora: no default targets for a {type(tower).__name__} tower; name its modules in "
        f"model.lora.targets (glob patterns, e.g. {sample_names(tower)})"
    )


def sample_names(tower: nn.Module, count: int = 4) -> list[str]:
    return [n for n, m in tower.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)][:count]


def resolve_targets(tower: nn.Module, patterns: Sequence[str] | None, side: str) -> list[str]:
    """The exact module names ``patterns`` (None: the tower's defaults) match, each checked adaptable."""
    patterns = default_targets(tower) if patterns is None else tuple(patterns)
    modules = dict(tower.named_modules())
    found = []
    for pattern in patterns:
        hits = [n for n in modules if n and fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(
                f"model.lora.targets.{side}: {pattern!r} matches no module of the {side} tower "
                f"(module names look like {sample_names(tower)})"
            )
        found += [n for n in hits if n not in found]
    for name in found:
        parent = modules[name.rpartition(".")[0]]
        if isinstance(modules[name], nn.MultiheadAttention) or isinstance(parent, nn.MultiheadAttention):
            raise ValueError(
                f"model.lora.targets.{side}: {name} is (inside) an nn.MultiheadAttention, which reads its "
                "weights without calling the module, so an adapter there would never run; target the MLP "
                "linears (the defaults) or other nn.Linear/nn.Conv2d modules"
            )
        if not isinstance(modules[name], nn.Linear | nn.Conv2d):
            raise ValueError(
                f"model.lora.targets.{side}: {name} is a {type(modules[name]).__name__}; LoRA adapts "
                "nn.Linear and nn.Conv2d modules"
            )
    return found


def add_lora(
    tower: nn.Module,
    targets: Sequence[str] | None,
    rank: int,
    alpha: float,
    dropout: float,
    side: str,
    keep_trainable: bool = False,
) -> int:
    """Inject LoRA adapters into ``tower`` in place; returns how many modules were adapted. The base weights
    are frozen, except (``keep_trainable``) those that were trainable before: a locked tower's unlocked
    groups."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"model.lora.rank must be an integer >= 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.lora.dropout must be in [0, 1), got {dropout}")
    names = resolve_targets(tower, targets, side)
    if not names:
        return 0
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad} if keep_trainable else set()
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none")
    inject_adapter_in_model(config, tower)  # leaves only the adapters trainable
    for name, p in tower.named_parameters():
        if base_name(name) in trainable:
            p.requires_grad_(True)
    for module in tower.modules():
        if isinstance(module, nn.TransformerEncoderLayer) and has_adapters(module):
            # its inference fast path reads linear1/linear2's (base) weights without calling them, which
            # would skip the adapters in evaluation; this flag only chooses that path, never the maths
            module.lora_fast_path, module.activation_relu_or_gelu = module.activation_relu_or_gelu, 0
    if hasattr(tower, "adapted"):
        tower.adapted = True  # a locked tower with adapters runs with autograd (towers.LockableTower)
    return len(names)


def base_name(name: str) -> str:
    """A parameter's name before injection (``x.base_layer.weight`` -> ``x.weight``)."""
    return name.replace(".base_layer.", ".")


def is_adapter_parameter(name: str) -> bool:
    return ".lora_" in name


def has_adapters(model: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


@torch.no_grad()
def merge_(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the base module back in its place (in place);
    returns ``model``, now free of peft modules."""
    from peft.tuners.lora import LoraLayer

    adapted = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, module in adapted:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    for module in model.modules():
        if hasattr(module, "lora_fast_path"):  # back on the fast path, as built
            module.activation_relu_or_gelu = module.lora_fast_path
            del module.lora_fast_path
        if hasattr(module, "adapted"):
            module.adapted = False
    return model


def merged(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its adapters merged (``model`` itself is returned when it has none)."""
    return merge_(copy.deepcopy(model)) if has_adapters(model) else model


def lora_options(lora: Mapping | None) -> dict | None:
    """``model.lora`` as arguments of ``add_lora`` per tower, or None when off."""
    if not lora or not lora.get("enabled"):
        return None
    targets = lora.get("targets") or {}
    unknown = sorted(set(targets) - set(TOWERS))
    if unknown:
        raise ValueError(f"model.lora.targets: unknown towers {unknown}; give image and/or text")
    return {
        "rank": int(lora.get("rank", 8)),
        "alpha": float(lora.get("alpha", 16)),
        "dropout": float(lora.get("dropout", 0.0)),
        "targets": {side: targets.get(side) for side in TOWERS},
    }
