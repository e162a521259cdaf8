"""Structured pruning: exact text-tower conversion, ratio 0 is the identity, ratio 0.5 really shrinks the
modules, the least important structures go first (l1/l2/taylor), global scope, argument checks."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from autoglm_train.compress.prune import (
    PrunableEncoder,
    PrunableEncoderLayer,
    accumulate_grads,
    convert_text_tower,
    count_params,
    estimate_flops,
    prune_model,
    taylor_scores_from_grads,
)
from autoglm_train.model.dual_encoder import DualEncoder
from autoglm_train.model.towers import ImageTower, TextTower

# the longest row has no padding (TextTower trims all-padding columns), the others do
TOKENS = torch.tensor([[1, 5, 6, 7, 2, 0, 0], [1, 8, 2, 0, 0, 0, 0], [3, 4, 5, 6, 7, 8, 9]])
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def text_tower(pool: str = "mean", dropout: float = 0.1) -> TextTower:
    torch.manual_seed(0)
    return TextTower(30, width=32, depth=2, heads=4, context_length=16, pool=pool, dropout=dropout).eval()


def vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=32,
        embed_dim=64,
        depth=2,
        num_heads=4,
    ).eval()


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Trained-looking BatchNorms (timm zero-inits the last gamma of each block, which would hide bugs)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(timm.create_model("resnet18", pretrained=False, num_classes=0))


def bottleneck_resnet() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(ResNet(Bottleneck, [1, 1, 1, 1], num_classes=0, channels=(16, 32, 64, 128)))


def dual_encoder() -> DualEncoder:
    torch.manual_seed(0)
    model = DualEncoder(
        ImageTower("resnet18"), TextTower(50, width=32, depth=1, heads=2, context_length=12), embed_dim=16
    )
    randomize_batchnorm(model)
    return model.eval()


def run(model: nn.Module) -> torch.Tensor | tuple:
    with torch.no_grad():
        if isinstance(model, DualEncoder):
            return model(IMAGES, TOKENS[:, :6])
        return model(TOKENS if isinstance(model, TextTower) else IMAGES)


def inputs(model: nn.Module) -> torch.Tensor | tuple:
    if isinstance(model, DualEncoder):
        return (IMAGES, TOKENS[:, :6])
    return TOKENS if isinstance(model, TextTower) else IMAGES


# ---- text-tower conversion -------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_converted_text_tower_computes_the_same(pool):
    tower = text_tower(pool)
    before = run(tower)
    with torch.enable_grad():  # the non-fast path of nn.MultiheadAttention too
        before_grad = tower(TOKENS)
    convert_text_tower(tower)
    assert isinstance(tower.encoder, PrunableEncoder)
    assert all(isinstance(layer, PrunableEncoderLayer) for layer in tower.encoder.layers)
    torch.testing.assert_close(run(tower), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tower(TOKENS), before_grad, rtol=1e-5, atol=1e-5)
    assert convert_text_tower(tower).encoder is tower.encoder  # idempotent


# ---- ratio 0 is the identity -----------------------------------------------------------------------------


@pytest.mark.parametrize("build", [text_tower, vit, resnet18, bottleneck_resnet, dual_encoder])
def test_ratio_zero_changes_nothing(build):
    model = build()
    before, params = run(model), count_params(model)
    report = prune_model(model, 0.0)
    assert report["removed"] == {"heads": 0, "mlp": 0, "channels": 0}
    assert report["params_before"] == report["params_after"] == count_params(model) == params
    torch.testing.assert_close(run(model), before, rtol=1e-5, atol=1e-5)


# ---- ratio 0.5 really shrinks ----------------------------------------------------------------------------


def check_text_halved(tower: TextTower) -> None:
    for layer in tower.encoder.layers:
        assert layer.heads == 2 and layer.q.out_features == layer.v.out_features == 16
        assert layer.out_proj.in_features == 16 and layer.out_proj.out_features == 32
        assert layer.linear1.out_features == layer.linear2.in_features == 64


def check_vit_halved(model: nn.Module) -> None:
    for block in model.blocks:
        assert block.attn.num_heads == 2 and block.attn.head_dim == 16
        assert block.attn.qkv.out_features == 3 * 32 and block.attn.proj.in_features == 32
        assert block.mlp.fc1.out_features == block.mlp.fc2.in_features == 128


def check_resnet_halved(model: nn.Module) -> None:
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock | Bottleneck)]
    assert blocks
    for block in blocks:
        inner = block.conv2.out_channels if isinstance(block, BasicBlock) else block.conv3.out_channels // 4
        assert block.conv1.out_channels == block.bn1.num_features == block.conv2.in_channels
        assert block.bn1.running_mean.shape == (block.conv1.out_channels,)
        if isinstance(block, BasicBlock):
            assert block.conv1.out_channels == inner // 2  # output width (conv2.out) untouched
        else:
            assert (
                block.conv1.out_channels == block.conv2.out_channels == block.conv3.in_channels == inner // 2
            )
            assert block.bn2.num_features == inner // 2


@pytest.mark.parametrize(
    "build, check, out_shape",
    [
        (text_tower, check_text_halved, (3, 32)),
        (vit, check_vit_halved, (2, 64)),
        (resnet18, check_resnet_halved, (2, 512)),
        (bottleneck_resnet, check_resnet_halved, (2, 512)),
    ],
)
def test_half_ratio_removes_half_of_each_layer(build, check, out_shape):
    model = build()
    flops = estimate_flops(model, inputs(model))
    report = prune_model(model, 0.5, importance="l2")
    check(model)
    assert report["params_after"] == count_params(model) < report["params_before"]
    assert all(after == max(1, round(before / 2)) for before, after in report["layers"].values())
    assert isinstance(estimate_flops(model, inputs(model)), int)
    assert 0 < estimate_flops(model, inputs(model)) < flops
    assert run(model).shape == out_shape
    model.train()(inputs(model)).sum().backward()  # still trainable


def test_half_ratio_prunes_a_whole_dual_encoder():
    model = dual_encoder()
    report = prune_model(model, 0.5)
    assert report["removed"]["heads"] == 1 and report["removed"]["mlp"] == 64
    assert report["removed"]["channels"] == (64 + 128 + 256 + 512) * 2 // 2
    image, text, _ = run(model)
    assert image.shape == (2, 16) and text.shape == (3, 16)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(2))
    assert report["params_after"] < report["params_before"]


# ---- the least important structures go first -------------------------------------------------------------


def zero_text_structures(tower: TextTower, heads: list[int], channels: torch.Tensor) -> None:
    """Zero everything these heads and MLP channels own: they contribute nothing to the output."""
    with torch.no_grad():
        for layer in tower.encoder.layers:
            for h in heads:
                rows = slice(h * 8, (h + 1) * 8)
                for lin in (layer.q, layer.k, layer.v):
                    lin.weight[rows] = 0
                    lin.bias[rows] = 0
                layer.out_proj.weight[:, rows] = 0
            layer.linear1.weight[channels] = 0
            layer.linear1.bias[channels] = 0
            layer.linear2.weight[:, channels] = 0


@pytest.mark.parametrize("importance", ["l1", "l2"])
def test_zeroed_text_structures_are_removed_and_output_is_unchanged(importance):
    tower = convert_text_tower(text_tower())
    zero_text_structures(tower, [1, 3], torch.randperm(128)[:64])
    before = run(tower)
    prune_model(tower, 0.5, importance=importance)
    check_text_halved(tower)
    torch.testing.assert_close(run(tower), before, rtol=1e-5, atol=1e-5)
    for layer in tower.encoder.layers:
        assert (layer.linear1.weight.abs().sum(1) > 0).all() and (layer.q.weight.abs().sum(1) > 0).all()


def test_zeroed_vit_structures_are_removed_and_output_is_unchanged():
    model = vit()
    with torch.no_grad():
        for block in model.blocks:
            for h in (0, 2):
                for part in range(3):  # q, k and v blocks of the fused qkv
                    rows = slice(part * 64 + h * 16, part * 64 + (h + 1) * 16)
                    block.attn.qkv.weight[rows], block.attn.qkv.bias[rows] = 0, 0
                block.attn.proj.weight[:, h * 16 : (h + 1) * 16] = 0
            channels = torch.randperm(256)[:128]
            block.mlp.fc1.weight[channels], block.mlp.fc1.bias[channels] = 0, 0
            block.mlp.fc2.weight[:, channels] = 0
    before = run(model)
    prune_model(model, 0.5)
    check_vit_halved(model)
    torch.testing.assert_close(run(model), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", [resnet18, bottleneck_resnet])
def test_zeroed_conv_channels_are_removed_and_output_is_unchanged(build):
    model = build()
    pairs = [("conv1", "conv2"), ("conv2", "conv3")]
    with torch.no_grad():
        for block in [m for m in model.modules() if isinstance(m, BasicBlock | Bottleneck)]:
            for producer, consumer in pairs[: 1 if isinstance(block, BasicBlock) else 2]:
                width = getattr(block, producer).out_channels
                channels = torch.randperm(width)[: width // 2]
                getattr(block, producer).weight[channels] = 0
                getattr(block, consumer).weight[:, channels] = 0  # BN's beta still leaks in; this cuts it
    before = run(model)
    report = prune_model(model, 0.5, targets=("channels",))
    check_resnet_halved(model)
    assert report["removed"]["channels"] > 0
    torch.testing.assert_close(run(model), before, rtol=1e-5, atol=1e-5)


def test_small_batchnorm_gamma_marks_a_weak_channel():
    model = resnet18()
    block = model.layer1[0]
    with torch.no_grad():
        block.bn1.weight[:5] = 1e-4  # the filters themselves are as large as any
    weak = block.conv1.weight[:5].detach().clone()
    prune_model(model, 0.5, targets=("channels",))
    kept = block.conv1.weight.detach()
    assert kept.shape[0] == 32
    assert not any(torch.equal(k, w) for k in kept for w in weak)


# ---- taylor importance -----------------------------------------------------------------------------------


def head_taylor(layer: PrunableEncoderLayer, head: int) -> float:
    """|sum(w * grad)| over everything head ``head`` owns, written out by hand."""
    rows = slice(head * 8, (head + 1) * 8)
    with torch.no_grad():
        total = sum(
            (p * p.grad)[rows].sum() for lin in (layer.q, layer.k, layer.v) for p in (lin.weight, lin.bias)
        )
        total += (layer.out_proj.weight * layer.out_proj.weight.grad)[:, rows].sum()
    return abs(total.item())


def test_taylor_removes_zero_gradient_structures_first():
    tower = text_tower()
    batches = [TOKENS, TOKENS.flip(0)]
    loss = accumulate_grads(tower, lambda m, batch: m(batch).pow(2).sum(), batches)
    assert loss > 0 and not tower.training
    convert_text_tower(tower)  # gradients come along with the split q/k/v
    layer0 = tower.encoder.layers[0]
    assert layer0.q.weight.grad is not None and layer0.out_proj.weight.grad is not None
    channels = torch.arange(0, 128, 4)
    with torch.no_grad():
        for layer in tower.encoder.layers:
            for lin in (layer.q, layer.k, layer.v):
                lin.weight.grad[16:24], lin.bias.grad[16:24] = 0, 0  # head 2
            layer.out_proj.weight.grad[:, 16:24] = 0
            layer.linear1.weight.grad[channels], layer.linear1.bias.grad[channels] = 0, 0
            layer.linear2.weight.grad[:, channels] = 0
    scores = taylor_scores_from_grads(tower)
    assert scores["encoder.layers.0.attn"][0].item() == pytest.approx(head_taylor(layer0, 0), rel=1e-4)
    assert scores["encoder.layers.0.attn"][2] == 0 and (scores["encoder.layers.0.mlp"][channels] == 0).all()

    q_before = [layer.q.weight.detach().clone() for layer in tower.encoder.layers]
    w1_before = [layer.linear1.weight.detach().clone() for layer in tower.encoder.layers]
    prune_model(tower, 0.25, importance="taylor", grads_available=True)
    kept_channels = torch.tensor([c for c in range(128) if c % 4])
    for layer, q, w1 in zip(tower.encoder.layers, q_before, w1_before, strict=True):
        assert layer.heads == 3
        torch.testing.assert_close(layer.q.weight, torch.cat([q[:16], q[24:]]))
        torch.testing.assert_close(layer.linear1.weight, w1[kept_channels])


# ---- global scope ----------------------------------------------------------------------------------------


def test_global_scope_removes_more_from_a_uniformly_weaker_layer():
    tower = convert_text_tower(text_tower())
    with torch.no_grad():
        weak = tower.encoder.layers[1]
        for p in (weak.linear1.weight, weak.linear1.bias, weak.linear2.weight):
            p.mul_(0.1)
    report = prune_model(tower, 0.5, scope="global", targets=("mlp",))
    kept0, kept1 = report["layers"]["encoder.layers.0.mlp"][1], report["layers"]["encoder.layers.1.mlp"][1]
    assert kept1 < kept0 and report["removed"] == {"heads": 0, "mlp": 128, "channels": 0}
    assert kept1 >= 1 and tower.encoder.layers[0].heads == 4


def test_global_scope_keeps_at_least_one_per_layer():
    tower = convert_text_tower(text_tower())
    with torch.no_grad():
        tower.encoder.layers[1].linear1.weight.zero_()
        tower.encoder.layers[1].linear2.weight.zero_()
        tower.encoder.layers[1].linear1.bias.zero_()
    report = prune_model(tower, 0.6, scope="global", targets=("mlp",))
    assert report["layers"]["encoder.layers.1.mlp"][1] == 1
    assert report["removed"]["mlp"] == round(0.6 * 256)
    assert run(tower).shape == (3, 32)


def test_per_layer_scope_ignores_other_layers():
    tower = convert_text_tower(text_tower())
    with torch.no_grad():
        tower.encoder.layers[1].linear1.weight.mul_(0.1)
    report = prune_model(tower, 0.5, targets=("mlp",))
    assert report["layers"]["encoder.layers.0.mlp"] == report["layers"]["encoder.layers.1.mlp"] == (128, 64)


# ---- argument checks -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ratio": -0.1}, "ratio"),
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": math.nan}, "ratio"),
        ({"ratio": 0.5, "importance": "l3"}, "importance"),
        ({"ratio": 0.5, "scope": "layer"}, "scope"),
        ({"ratio": 0.5, "targets": ("neurons",)}, "targets"),
        ({"ratio": 0.5, "importance": "taylor"}, "accumulate_grads"),
        ({"ratio": 0.5, "importance": "taylor", "grads_available": True}, "no prunable weight has a .grad"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    tower = text_tower()
    with pytest.raises(ValueError, match=match):
        prune_model(tower, **kwargs)


def test_accumulate_grads_needs_batches():
    with pytest.raises(ValueError, match="no calibration batches"):
        accumulate_grads(text_tower(), lambda m, b: m(b).sum(), [])
