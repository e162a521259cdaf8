"""INT8 for CPU inference: dynamic quantization of Linear layers (weights int8, activations quantized on
the fly: the transformer text tower and projections), and static, calibrated quantization of a
convolutional image tower (FX graph mode: conv + BN + ReLU fused, activations observed on a calibration
set)."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn
from torch.ao.quantization import get_default_qconfig_mapping, quantize_dynamic
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from autoglm_train.compress.prune import convert_text_tower

ENGINE = "x86"  # fbgemm + onednn kernels: what CPUs serving this model have


def quantize_linears(module: nn.Module) -> nn.Module:
    """A copy with every ``nn.Linear`` dynamically quantized to int8."""
    torch.backends.quantized.engine = ENGINE
    # quantize_dynamic swaps children: a bare Linear (a projection head) goes in a wrapper to be swapped
    wrapped = nn.Sequential(copy.deepcopy(module).eval())
    return quantize_dynamic(wrapped, {nn.Linear}, dtype=torch.qint8)[0]


def is_convolutional(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules()) and not any(
        isinstance(m, nn.MultiheadAttention) or type(m).__name__ == "Attention" for m in module.modules()
    )


@torch.no_grad()
def quantize_static(module: nn.Module, calibration: Iterable[torch.Tensor]) -> nn.Module:
    """A copy of a convolutional module with int8 weights and activations, its ranges observed on
    ``calibration`` batches. The result takes and returns float tensors."""
    torch.backends.quantized.engine = ENGINE
    batches = list(calibration)
    if not batches:
        raise ValueError("static quantization needs at least one calibration batch")
    prepared = prepare_fx(
        copy.deepcopy(module).eval(), get_default_qconfig_mapping(ENGINE), example_inputs=(batches[0],)
    )
    for batch in batches:
        prepared(batch)
    return convert_fx(prepared)


def quantize_model(model, calibration_images: Iterable[torch.Tensor] | None = None):
    """A copy of a dual encoder for CPU serving: the image tower statically quantized when it is
    convolutional and calibration images are given (else its Linears dynamically), the text tower and
    both projections dynamically."""
    out = copy.deepcopy(model).eval()
    # torch's TransformerEncoderLayer fast path reads Linear weights as tensors, which quantized Linears
    # no longer have: the text tower runs on our equivalent layers (a no-op if already converted)
    convert_text_tower(out.text_tower)
    backbone = out.image_tower.backbone
    if calibration_images is not None and is_convolutional(backbone):
        out.image_tower.backbone = quantize_static(backbone, calibration_images)
    else:
        out.image_tower = quantize_linears(out.image_tower)
    out.text_tower = quantize_linears(out.text_tower)
    out.image_proj = quantize_linears(out.image_proj)
    out.text_proj = quantize_linears(out.text_proj)
    return out
