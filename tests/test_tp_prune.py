"""Torch-Pruning pruner: the same cuts as the hand pruner on our towers, timm ViT / ResNet and a Hugging Face
BERT; ratio 0 is the identity; zeroed structures go first; towers it cannot cut raise, naming the blocks."""

from __future__ import annotations

import pytest
import timm
import torch
from test_prune import (
    IMAGES,
    TOKENS,
    bottleneck_resnet,
    check_resnet_halved,
    check_text_halved,
    check_vit_halved,
    dual_encoder,
    run,
    text_tower,
    vit,
)
from torch import nn
from transformers import BertConfig, BertModel

from autoglm_train.compress.prune import accumulate_grads, convert_text_tower, count_params, prune_model
from autoglm_train.compress.tp_prune import tp_prune_model

DUAL_INPUTS = {"image": IMAGES, "text": TOKENS[:, :6]}


def bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2, vocab_size=100
    )
    return BertModel(config).eval()


def example(model: nn.Module):
    if isinstance(model, BertModel):
        return {"input_ids": TOKENS}
    return TOKENS if hasattr(model, "token_embedding") else IMAGES


def output(model: nn.Module) -> torch.Tensor:
    if isinstance(model, BertModel):
        with torch.no_grad():
            return model(input_ids=TOKENS).last_hidden_state
    return run(model)


def check_bert_halved(model: BertModel) -> None:
    for layer in model.encoder.layer:
        attn = layer.attention.self
        assert attn.num_attention_heads == 2 and attn.all_head_size == 16
        assert attn.query.out_features == attn.key.out_features == attn.value.out_features == 16
        out = layer.attention.output.dense
        assert out.in_features == 16 and out.out_features == 32
        assert layer.intermediate.dense.out_features == layer.output.dense.in_features == 32


def still_trains(model: nn.Module) -> None:
    model.train()
    if isinstance(model, BertModel):
        model(input_ids=TOKENS).last_hidden_state.sum().backward()
    else:
        model(example(model)).sum().backward()


# ---- ratio 0 is the identity -----------------------------------------------------------------------------


@pytest.mark.parametrize("build", [text_tower, vit, bottleneck_resnet, bert])
def test_ratio_zero_changes_nothing(build):
    model = build()
    before, params = output(model), count_params(model)
    report = tp_prune_model(model, 0.0, example(model))
    assert report["removed"] == {"heads": 0, "mlp": 0, "channels": 0}
    assert report["params_before"] == report["params_after"] == count_params(model) == params
    assert report["layers"] and all(b == a for b, a in report["layers"].values())
    torch.testing.assert_close(output(model), before, rtol=1e-5, atol=1e-5)


# ---- ratio 0.5 halves heads, MLP hidden and inner conv channels, as the hand pruner does -------------------


@pytest.mark.parametrize(
    "build, check, hand_too",
    [
        (text_tower, check_text_halved, True),
        (vit, check_vit_halved, True),
        (bottleneck_resnet, check_resnet_halved, True),
        (bert, check_bert_halved, False),
    ],
)
def test_half_ratio_halves_each_layer(build, check, hand_too):
    model = build()
    shape = output(model).shape
    report = tp_prune_model(model, 0.5, example(model), importance="l2")
    check(model)
    assert output(model).shape == shape
    assert report["params_after"] == count_params(model) < report["params_before"]
    assert all(after == before // 2 for before, after in report["layers"].values())
    if hand_too:  # same counts, so the same parameter total as prune_model
        assert prune_model(build(), 0.5)["params_after"] == report["params_after"]
    still_trains(model)


def test_half_ratio_prunes_a_whole_dual_encoder_but_not_its_projections():
    model = dual_encoder()
    projections = model.image_proj.weight.shape, model.text_proj.weight.shape
    report = tp_prune_model(model, 0.5, DUAL_INPUTS)
    assert report["removed"] == {"heads": 1, "mlp": 64, "channels": (64 + 128 + 256 + 512) * 2 // 2}
    assert "image_tower.backbone.layer1.0.conv1" in report["layers"]
    assert "text_tower.encoder.layers.0.attn" in report["layers"]
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
    tp_prune_model(tower, 0.5, TOKENS)
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
    tp_prune_model(model, 0.5, IMAGES)
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
    before = output(model)
    query = [layer.attention.self.query.weight.detach().clone() for layer in model.encoder.layer]
    tp_prune_model(model, 0.5, {"input_ids": TOKENS})
    check_bert_halved(model)
    torch.testing.assert_close(output(model), before, rtol=1e-5, atol=1e-5)
    for layer, q in zip(model.encoder.layer, query, strict=True):
        torch.testing.assert_close(layer.attention.self.query.weight, torch.cat([q[:8], q[24:]]))


def test_zeroed_conv_channels_are_removed():
    model = bottleneck_resnet()
    with torch.no_grad():
        for block in [m for m in model.modules() if isinstance(m, timm.models.resnet.Bottleneck)]:
            for producer, consumer in (("conv1", "conv2"), ("conv2", "conv3")):
                width = getattr(block, producer).out_channels
                channels = torch.randperm(width)[: width // 2]
                getattr(block, producer).weight[channels] = 0
                getattr(block, consumer).weight[:, channels] = 0  # BN's beta still leaks in; this cuts it
    before = run(model)
    report = tp_prune_model(model, 0.5, IMAGES, targets=("channels",))
    check_resnet_halved(model)
    assert report["removed"]["channels"] > 0 and report["removed"]["heads"] == report["removed"]["mlp"] == 0
    torch.testing.assert_close(run(model), before, rtol=1e-5, atol=1e-5)


# ---- taylor, global scope, frozen towers ------------------------------------------------------------------


def test_taylor_removes_zero_gradient_heads_and_needs_gradients():
    tower = text_tower()
    with pytest.raises(ValueError, match="without .grad"):
        tp_prune_model(tower, 0.25, TOKENS, importance="taylor", grads_available=True)
    accumulate_grads(tower, lambda m, batch: m(batch).pow(2).sum(), [TOKENS])
    convert_text_tower(tower)  # the gradients come along
    q_before = [layer.q.weight.detach().clone() for layer in tower.encoder.layers]
    with torch.no_grad():
        for layer in tower.encoder.layers:
            for lin in (layer.q, layer.k, layer.v):
                lin.weight.grad[16:24] = 0  # head 2
            layer.out_proj.weight.grad[:, 16:24] = 0
    report = tp_prune_model(
        tower, 0.25, TOKENS, importance="taylor", grads_available=True, targets=("heads",)
    )
    assert report["removed"] == {"heads": 2, "mlp": 0, "channels": 0}
    for layer, q in zip(tower.encoder.layers, q_before, strict=True):
        assert layer.heads == 3
        torch.testing.assert_close(layer.q.weight, torch.cat([q[:16], q[24:]]))


def test_global_scope_removes_more_from_a_uniformly_weaker_layer():
    tower = convert_text_tower(text_tower())
    with torch.no_grad():
        weak = tower.encoder.layers[1]
        for p in (weak.linear1.weight, weak.linear1.bias, weak.linear2.weight):
            p.mul_(0.1)
    report = tp_prune_model(tower, 0.5, TOKENS, scope="global", targets=("mlp",))
    kept0, kept1 = report["layers"]["encoder.layers.0.mlp"][1], report["layers"]["encoder.layers.1.mlp"][1]
    assert kept1 < kept0 and kept1 >= 1 and report["removed"] == {"heads": 0, "mlp": 128, "channels": 0}
    assert run(tower).shape == (3, 32)


def test_frozen_tower_stays_frozen_and_in_its_mode():
    tower = text_tower()
    tower.lock(0)
    tower.train()
    tp_prune_model(tower, 0.5, TOKENS)
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
        tp_prune_model(encoder, 0.5, x)
    assert "layers.1.self_attn (MultiheadAttention)" in str(info.value)
    assert count_params(encoder) == params  # refused before anything was cut
    tp_prune_model(encoder, 0.5, x, targets=("channels",))  # no block of that kind: nothing to do

    torch.manual_seed(0)
    pooled = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, embed_dim=64, depth=1,
        num_heads=4, global_pool="map",
    ).eval()  # fmt: skip
    with pytest.raises(ValueError, match=r"attn_pool \(AttentionPoolLatent\)"):
        tp_prune_model(pooled, 0.5, IMAGES)
    tp_prune_model(pooled, 0.5, IMAGES, targets=("mlp",))
    assert pooled.blocks[0].mlp.fc1.out_features == 128


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="ratio"):
        tp_prune_model(text_tower(), 1.0, TOKENS)
    with pytest.raises(ValueError, match="accumulate_grads"):
        tp_prune_model(text_tower(), 0.5, TOKENS, importance="taylor")
    with pytest.raises(ValueError, match="'image'"):
        tp_prune_model(dual_encoder(), 0.5, (IMAGES, TOKENS))
