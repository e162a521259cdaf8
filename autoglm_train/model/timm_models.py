"""timm architectures of ours, registered under their names so that `model.image_tower.name` selects them
like any timm model (and a later override to another name drops their arguments with them).

``resnet18_narrow``: ResNet-18's depth with half its stage widths (32, 64, 128, 256), a quarter of its
convolution FLOPs. The default job's tower: on 64 px shapes it reaches ResNet-18's retrieval figures, and
on a CPU without bf16 the step takes under half the time (docs/results.md).
"""

from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet


def _cfg(**kwargs) -> dict:
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "interpolation": "bilinear",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "crop_pct": 0.875,
        "first_conv": "conv1",
        "classifier": "fc",
        **kwargs,
    }


# timm's register_model reads the pretrained configs from this module's `default_cfgs`; there are no
# released weights for these (random initialisation, or a checkpoint of ours)
default_cfgs = generate_default_cfgs({"resnet18_narrow.untrained": _cfg()})


@register_model
def resnet18_narrow(pretrained: bool = False, **kwargs) -> ResNet:
    args = {"block": BasicBlock, "layers": (2, 2, 2, 2), "channels": (32, 64, 128, 256)}
    return build_model_with_cfg(ResNet, "resnet18_narrow", pretrained, **{**args, **kwargs})
