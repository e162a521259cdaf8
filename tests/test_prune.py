"""Structured pruning (Torch-Pruning's dependency graph) of our towers, timm ViT / ResNet and a Hugging Face
BERT: exact text-tower conversion; ratio 0 is the identity; ratio 0.5 halves every layer and really shrinks
the modules and FLOPs; zeroed structures go first (l1, taylor); per-layer and global scope; towers it cannot
cut and bad arguments raise, naming what is wrong."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn
from transformers import BertConfig, BertModel

from autoglm_train.compress.prunable_text import PrunableEncoder, PrunableEncoderLayer, convert_text_tower
from autoglm_train.compress.prune import accumulate_grads, count_params, prune_model
from autoglm_train.compress.report import estimate_flops
from autoglm_train.model.dual_encoder import DualEncoder
from autoglm_train.model.towers import ImageTower, TextTower

# the longest row has no padding (TextTower trims all-padding columns), the others do
TOKENS = torch.tensor([[1, 5, 6, 7, 2, 0, 0], [1, 8, 2, 0, 0, 0, 0], [3, 4, 5, 6, 7, 8, 9]])
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
DUAL_INPUTS = {"image": IMAGES, "text": TOKENS[:, :6]}


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


def bottleneck_resnet() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(ResNet(Bottleneck, [1, 1, 1, 1], num_classes=0, channels=(16, 32, 64, 128)))


def narrow_resnet() -> nn.Module:
    """A stem wider than the first stage, which starts with a projection shortcut (as resnet18_narrow)."""
    torch.manual_seed(0)
    return randomize_batchnorm(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=0, channels=(16, 32, 64, 128)))


def dual_encoder() -> DualEncoder:
    torch.manual_seed(0)
    model = DualEncoder(
        ImageTower("resnet18"), TextTower(50, width=32, depth=1, heads=2, context_length=12), embed_dim=16
    )
    randomize_batchnorm(model)
    return model.eval()


def bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2, vocab_size=100
    )
    return BertModel(config).eval()


def example(model: nn.Module):
    if isinstance(model, BertModel):
        return {"input_ids": TOKENS}
    return TOKENS if isinstance(model, TextTower) else IMAGES


def run(model: nn.Module) -> torch.Tensor | tuple:
    with torch.no_grad():
        if isinstance(model, DualEncoder):
            return model(IMAGES, TOKENS[:, :6])
        if isinstance(model, BertModel):
            return model(input_ids=TOKENS).last_hidden_state
        return model(example(model))


def flops(model: nn.Module) -> int:
    return estimate_flops(model, (), forward=lambda: run(model))


def still_trains(model: nn.Module) -> None:
    model.train()
    if isinstance(model, BertModel):
        model(input_ids=TOKENS).last_hidden_state.sum().backward()
    else:
        model(example(model)).sum().backward()


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


def check_bert_halved(model: BertModel) -> None:
    for layer in model.encoder.layer:
        attn = layer.attention.self
        assert attn.num_attention_heads == 2 and attn.all_head_size == 16
        assert attn.query.out_features == attn.key.out_features == attn.value.out_features == 16
        out = layer.attention.output.dense
        assert out.in_features == 16 and out.out_features == 32
        assert layer.intermediate.dense.out_features == layer.output.dense.in_features == 32


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


@pytest.mark.parametrize("build", [text_tower, vit, bottleneck_resnet, bert])
def test_ratio_zero_changes_nothing(build):
    model = build()
    before, params = run(model), count_params(model)
    report = prune_model(model, 0.0, example(model))
    assert report["removed"] == {"heads": 0, "mlp": 0, "channels": 0, "stem": 0}
    assert report["params_before"] == report["params_after"] == count_params(model) == params
    assert report["layers"] and all(b == a for b, a in report["layers"].values())
    torch.testing.assert_close(run(model), before, rtol=1e-5, atol=1e-5)


# ---- ratio 0.5 halves heads, MLP hidden and inner conv channels ------------------------------------------


@pytest.mark.parametrize(
    "build, check",
    [
        (text_tower, check_text_halved),
        (vit, check_vit_halved),
        (bottleneck_resnet, check_resnet_halved),
        (bert, check_bert_halved),
    ],
)
def test_half_ratio_halves_each_layer(build, check):
    model = build()
    shape, flops_before = run(model).shape, flops(model)
    report = prune_model(model, 0.5, example(model), importance="l2")
    check(model)
    assert run(model).shape == shape
    assert report["params_after"] == count_params(model) < report["params_before"]
    assert all(after == before // 2 for before, after in report["layers"].values())  # each layer as asked
    assert 0 < flops(model) < flops_before
    still_trains(model)


def test_half_ratio_prunes_a_whole_dual_encoder_but_not_its_projections():
    model = dual_encoder()
    projections = model.image_proj.weight.shape, model.text_proj.weight.shape
    report = prune_model(model, 0.5, DUAL_INPUTS)
    channels = (64 + 128 + 256 + 512) * 2 // 2
    assert report["removed"] == {"heads": 1, "mlp": 64, "channels": channels, "stem": 0}
    # resnet18's stem width is layer1's residual stream: kept, and the report names what it would cut
    assert "layer1" in report["kept"]["image_tower.backbone.conv1"]
    assert "image_tower.backbone.layer1.0.conv1" in report["layers"]
    assert "text_tower.encoder.layers.0.attn" in report["layers"]
    check_resnet_halved(model.image_tower.backbone)  # BasicBlocks
    image, text, _ = run(model)
    assert image.shape == (2, 16) and text.shape == (3, 16)
    assert (model.image_proj.weight.shape, model.text_proj.weight.shape) == projections
    assert model.image_tower.width == model.image_tower.backbone.layer4[-1].conv2.out_channels == 512


# ---- the zeroed structures are the ones removed, and the output does not change -------------------------


def test_zeroed_text_heads_and_channels_are_removed():
    tower = convert_text_tower(text_tower())
    channels = torch.randperm(128, generator=torch.Generator().manual_seed(1))[:64]
    with torch.no_grad():
        for layer in tower.encoder.layers:
            for h in (1, 3):
                rows = slice(h * 8, (h + 1) * 8)
                for lin in (layer.q, layer.k, layer.v):
                    lin.weight[rows], lin.bias[rows] = 0, 0
                layer.out_proj.weight[:, rows] = 0
            layer.linear1.weight[channels], layer.linear1.bias[channels] = 0, 0
            layer.linear2.weight[:, channels] = 0
    before = run(tower)
    prune_model(tower, 0.5, TOKENS)
    check_text_halved(tower)
    torch.testing.assert_close(run(tower), before, rtol=1e-5, atol=1e-5)
    for layer in tower.encoder.layers:
        assert (layer.linear1.weight.abs().sum(1) > 0).all() and (layer.q.weight.abs().sum(1) > 0).all()


def test_zeroed_vit_heads_and_channels_are_removed():
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
    prune_model(model, 0.5, IMAGES)
    check_vit_halved(model)
    torch.testing.assert_close(run(model), before, rtol=1e-5, atol=1e-5)


def test_zeroed_bert_heads_and_channels_are_removed():
    model = bert()
    with torch.no_grad():
        for layer in model.encoder.layer:
            attn = layer.attention.self
            for lin in (attn.query, attn.key, attn.value):
                lin.weight[8:24], lin.bias[8:24] = 0, 0  # heads 1 and 2
            layer.attention.output.dense.weight[:, 8:24] = 0
            layer.intermediate.dense.weight[::2], layer.intermediate.dense.bias[::2] = 0, 0
            layer.output.dense.weight[:, ::2] = 0
    before = run(model)
    query = [layer.attention.self.query.weight.detach().clone() for layer in model.encoder.layer]
    prune_model(model, 0.5, {"input_ids": TOKENS})
    check_bert_halved(model)
    torch.testing.assert_close(run(model), before, rtol=1e-5, atol=1e-5)
    for layer, q in zip(model.encoder.layer, query, strict=True):
        torch.testing.assert_close(layer.attention.self.query.weight, torch.cat([q[:8], q[24:]]))


def test_zeroed_conv_channels_are_removed():
    model = bottleneck_resnet()
    with torch.no_grad():
        for block in [m for m in model.modules() if isinstance(m, Bottleneck)]:
            for producer, consumer in (("conv1", "conv2"), ("conv2", "conv3")):
                width = getattr(block, producer).out_channels
                channels = torch.randperm(width)[: width // 2]
                getattr(block, producer).weight[channels] = 0
                getattr(block, consumer).weight[:, channels] = 0  # BN's beta still leaks in; this cuts it
    before = run(model)
    report = prune_model(model, 0.5, IMAGES, targets=("channels",))
    check_resnet_halved(model)
    assert report["removed"]["channels"] > 0 and report["removed"]["heads"] == report["removed"]["mlp"] == 0
    torch.testing.assert_close(run(model), before, rtol=1e-5, atol=1e-5)


def test_zeroed_stem_channels_are_removed_where_the_stem_is_no_residual_stream():
    model = narrow_resnet()
    first = model.layer1[0]
    channels = torch.randperm(64, generator=torch.Generator().manual_seed(2))[:32]
    with torch.no_grad():
        model.conv1.weight[channels] = 0
        first.conv1.weight[:, channels] = 0  # BN's beta still leaks in; this cuts it
        first.downsample[0].weight[:, channels] = 0
    before = run(model)
    report = prune_model(model, 0.5, IMAGES, targets=("stem",))
    assert report["removed"] == {"heads": 0, "mlp": 0, "channels": 0, "stem": 32} and report["kept"] == {}
    assert model.conv1.out_channels == model.bn1.num_features == 32
    assert first.conv1.in_channels == first.downsample[0].in_channels == 32
    assert (model.conv1.weight.abs().sum((1, 2, 3)) > 0).all()
    torch.testing.assert_close(run(model), before, rtol=1e-5, atol=1e-5)
    still_trains(model)


# ---- taylor importance -----------------------------------------------------------------------------------


def test_taylor_removes_zero_gradient_structures_and_needs_gradients():
    tower = text_tower()
    with pytest.raises(ValueError, match="without .grad"):
        prune_model(tower, 0.25, TOKENS, importance="taylor", grads_available=True)
    tower.train()
    loss = accumulate_grads(tower, lambda m, batch: m(batch).pow(2).sum(), [TOKENS, TOKENS.flip(0)])
    assert loss > 0 and tower.training and tower.encoder.layers[0].dropout.training  # mode restored
    convert_text_tower(tower.eval())
    layer0 = tower.encoder.layers[0]
    assert layer0.q.weight.grad is not None and layer0.out_proj.weight.grad is not None  # came along
    channels = torch.arange(0, 128, 4)
    q_before = [layer.q.weight.detach().clone() for layer in tower.encoder.layers]
    w1_before = [layer.linear1.weight.detach().clone() for layer in tower.encoder.layers]
    with torch.no_grad():
        for layer in tower.encoder.layers:
            for lin in (layer.q, layer.k, layer.v):
                lin.weight.grad[16:24], lin.bias.grad[16:24] = 0, 0  # head 2
            layer.out_proj.weight.grad[:, 16:24] = 0
            layer.linear1.weight.grad[channels], layer.linear1.bias.grad[channels] = 0, 0
            layer.linear2.weight.grad[:, channels] = 0
    report = prune_model(tower, 0.25, TOKENS, importance="taylor", grads_available=True)
    assert report["removed"] == {"heads": 2, "mlp": 64, "channels": 0, "stem": 0}
    kept_channels = torch.tensor([c for c in range(128) if c % 4])
    for layer, q, w1 in zip(tower.encoder.layers, q_before, w1_before, strict=True):
        assert layer.heads == 3
        torch.testing.assert_close(layer.q.weight, torch.cat([q[:16], q[24:]]))
        torch.testing.assert_close(layer.linear1.weight, w1[kept_channels])


# ---- per-layer and global scope --------------------------------------------------------------------------


def test_per_layer_scope_ignores_other_layers():
    tower = convert_text_tower(text_tower())
    with torch.no_grad():
        tower.encoder.layers[1].linear1.weight.mul_(0.1)
    report = prune_model(tower, 0.5, TOKENS, targets=("mlp",))
    assert report["layers"]["encoder.layers.0.mlp"] == report["layers"]["encoder.layers.1.mlp"] == (128, 64)


def test_global_scope_removes_more_from_a_uniformly_weaker_layer():
    tower = convert_text_tower(text_tower())
    with torch.no_grad():
        weak = tower.encoder.layers[1]
        for p in (weak.linear1.weight, weak.linear1.bias, weak.linear2.weight):
            p.mul_(0.1)
    report = prune_model(tower, 0.5, TOKENS, scope="global", targets=("mlp",))
    kept0, kept1 = report["layers"]["encoder.layers.0.mlp"][1], report["layers"]["encoder.layers.1.mlp"][1]
    assert kept1 < kept0 and kept1 >= 1
    assert report["removed"] == {"heads": 0, "mlp": 128, "channels": 0, "stem": 0}
    assert tower.encoder.layers[0].heads == 4 and run(tower).shape == (3, 32)


def test_global_scope_keeps_at_least_one_per_layer():
    tower = convert_text_tower(text_tower())
    with torch.no_grad():
        tower.encoder.layers[1].linear1.weight.zero_()
        tower.encoder.layers[1].linear2.weight.zero_()
        tower.encoder.layers[1].linear1.bias.zero_()
    report = prune_model(tower, 0.6, TOKENS, scope="global", targets=("mlp",))
    assert report["layers"]["encoder.layers.1.mlp"][1] == 1
    assert report["removed"]["mlp"] == round(0.6 * 256)
    assert run(tower).shape == (3, 32)


def test_frozen_tower_stays_frozen_and_in_its_mode():
    tower = text_tower()
    tower.lock(0)
    tower.train()
    prune_model(tower, 0.5, TOKENS)
    check_text_halved(tower)
    assert tower.locked and not tower.training
    assert not any(p.requires_grad for p in tower.parameters())


# ---- what it cannot prune, it refuses by name -------------------------------------------------------------


def test_unprunable_blocks_raise_with_their_names():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, norm_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 32)
    params = count_params(encoder)
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn \(MultiheadAttention\)") as info:
        prune_model(encoder, 0.5, x)
    assert "layers.1.self_attn (MultiheadAttention)" in str(info.value)
    assert count_params(encoder) == params  # refused before anything was cut
    prune_model(encoder, 0.5, x, targets=("channels",))  # no block of that kind: nothing to do

    torch.manual_seed(0)
    pooled = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, embed_dim=64, depth=1,
        num_heads=4, global_pool="map",
    ).eval()  # fmt: skip
    with pytest.raises(ValueError, match=r"attn_pool \(AttentionPoolLatent\)"):
        prune_model(pooled, 0.5, IMAGES)
    prune_model(pooled, 0.5, IMAGES, targets=("mlp",))
    assert pooled.blocks[0].mlp.fc1.out_features == 128


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
        ({"ratio": 0.5, "targets": ()}, "targets"),
        ({"ratio": 0.5, "importance": "taylor"}, "accumulate_grads"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        prune_model(text_tower(), example_inputs=TOKENS, **kwargs)


def test_a_dual_encoder_needs_inputs_per_tower():
    with pytest.raises(ValueError, match="'image'"):
        prune_model(dual_encoder(), 0.5, (IMAGES, TOKENS))


def test_accumulate_grads_needs_batches():
    with pytest.raises(ValueError, match="no calibration batches"):
        accumulate_grads(text_tower(), lambda m, b: m(b).sum(), [])
