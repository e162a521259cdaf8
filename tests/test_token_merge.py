"""Token merging (compress/token_merge.py) in a tiny timm ViT: r = 0 is the unmerged tower, the matching
and size-weighted merge against a brute-force reference, lossless merging of duplicate tokens (proportional
attention and weighted pooling), the report's row family with its ONNX exports equal to PyTorch, and the
config error for a tower that has no tokens to merge."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from autoglm_train.compress import token_merge
from autoglm_train.compress.report import token_merge_table
from autoglm_train.compress.run import check_merge_tower, merge_values, token_merge_family
from autoglm_train.compress.token_merge import (
    apply_token_merging,
    bipartite_merge,
    merge_counts,
    token_merged,
    tokens_left,
)
from autoglm_train.config_check import ConfigError
from autoglm_train.data.tokenizer import train_bpe
from autoglm_train.model.dual_encoder import DualEncoder
from autoglm_train.model.towers import ImageTower, TextTower

# 32 px in 8 px patches: 16 patch tokens (+ class token), two blocks
TINY_VIT = dict(depth=2, embed_dim=32, num_heads=2, img_size=32, patch_size=8)


def tiny_vit(global_pool="token"):
    torch.manual_seed(0)
    return ImageTower("vit_tiny_patch16_224", global_pool=global_pool, **TINY_VIT).eval()


@pytest.mark.parametrize("fused", [True, False], ids=["fused_attn", "plain_attn"])
@pytest.mark.parametrize("pool", ["token", "avg"])
def test_r0_equals_the_unmerged_tower(pool, fused):
    tower = tiny_vit(pool)
    for block in tower.backbone.blocks:
        block.attn.fused_attn = fused
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = tower(images)
        merged = copy.deepcopy(tower)
        apply_token_merging(merged.backbone, 0)
        assert type(merged.backbone).__name__ == "TokenMergingVisionTransformer"
        assert torch.allclose(merged(images), expected, rtol=0, atol=1e-6)
        apply_token_merging(merged.backbone, 3)
        assert not torch.allclose(merged(images), expected, atol=1e-3)  # r > 0 does change the features
    # the state dict is the tower's own: a merged tower loads the unmerged one's weights
    assert merged.state_dict().keys() == tower.state_dict().keys()


def reference_merge(x, size, metric, r, prefix):
    """Bipartite soft matching written as loops, one image at a time."""
    outs, sizes = [], []
    for xb, sb, mb in zip(x, size, metric, strict=True):
        a = list(range(prefix, len(xb), 2))
        b = list(range(prefix + 1, len(xb), 2))
        cos = F.cosine_similarity(mb[:, None], mb[None], dim=-1)  # (N, N)
        partner = {i: max(b, key=lambda j, i=i: cos[i, j]) for i in a}
        ranked = sorted(a, key=lambda i: -cos[i, partner[i]])
        merged, kept = ranked[:r], ranked[r:]
        rows, row_sizes = [xb[:prefix]], [sb[:prefix]]
        rows += [xb[i : i + 1] for i in kept]
        row_sizes += [sb[i : i + 1] for i in kept]
        for j in b:
            group = [j] + [i for i in merged if partner[i] == j]
            total = sum(sb[i] for i in group)
            rows.append((sum(xb[i] * sb[i] for i in group) / total)[None])
            row_sizes.append(total[None])
        outs.append(torch.cat(rows))
        sizes.append(torch.cat(row_sizes))
    return torch.stack(outs), torch.stack(sizes)


def test_bipartite_merge_matches_a_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    x, metric = torch.randn(2, 12, 6, generator=g), torch.randn(2, 12, 4, generator=g)
    size = torch.randint(1, 4, (2, 12, 1), generator=g).float()
    out, out_size = bipartite_merge(x, size, metric, r=3, prefix=1)
    expected, expected_size = reference_merge(x, size, metric, 3, 1)
    assert out.shape == (2, 9, 6)
    assert torch.allclose(out, expected, atol=1e-6) and torch.equal(out_size, expected_size)
    assert torch.equal(out_size.sum(1), size.sum(1))  # every patch still counted once
    assert merge_counts(17, 1, 3, 4) == [3, 3, 3, 3] and merge_counts(17, 1, 6, 3) == [6, 5, 2]


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_merging_duplicate_tokens_loses_nothing_with_proportional_attention(pool, monkeypatch):
    """Pairs of identical patches (no position embedding): merging one into the other, counted twice by the
    attention and the average, is exact; without proportional attention it is not."""
    tower = tiny_vit(pool)
    tower.backbone.pos_embed.data.zero_()
    g = torch.Generator().manual_seed(1)
    patterns = torch.randn(2, 3, 3, 8, 8, generator=g)  # two images, three kinds of patch each
    # of the 8 horizontal pairs of patches (4 x 4 grid). Every kind sits in an odd pair: those pairs' B
    # tokens are set B of the second block's split too, so each A token there has a duplicate to merge
    # into whichever A tokens the first block's exact ties (rounding decides them) left unmerged
    kinds = [0, 0, 0, 1, 0, 0, 0, 2]
    images = torch.zeros(2, 3, 32, 32)
    for pair, kind in enumerate(kinds):
        row, col = divmod(2 * pair, 4)
        for c in (col, col + 1):  # set A takes the even patches, B the odd: each pair is an A-B pair
            images[:, :, 8 * row : 8 * row + 8, 8 * c : 8 * c + 8] = patterns[:, kind]
    with torch.no_grad():
        expected = tower(images)
        merged = copy.deepcopy(tower)
        apply_token_merging(merged.backbone, 4)  # 16 -> 12 -> 8 tokens, every merge of duplicates
        assert torch.allclose(merged(images), expected, atol=1e-5)
        monkeypatch.setattr(
            token_merge, "attention", lambda attn, x, size, f=token_merge.attention: f(attn, x, None)
        )
        assert not torch.allclose(merged(images), expected, atol=1e-3)


@pytest.fixture(scope="module")
def tokenizer():
    captions = [f"a {s} {c} circle" for s in ("small", "large") for c in ("red", "blue")]
    return train_bpe(captions * 20, vocab_size=120, context_length=8, min_frequency=1)


def test_report_family_exports_each_r_and_onnx_equals_pytorch(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = DualEncoder(
        tiny_vit("avg"), TextTower(tokenizer.vocab_size, width=32, depth=1, heads=2, context_length=8), 16
    ).eval()
    g = torch.Generator().manual_seed(2)
    captions = ["a small red circle", "a large blue circle", "a small blue circle", "a large red circle"]
    val = [
        {
            "image": torch.randn(4, 3, 32, 32, generator=g),
            "text": tokenizer(captions),
            "id": torch.arange(4) + 4 * i,
            "text_id": torch.arange(4) + 4 * i,
        }
        for i in range(2)
    ]
    example = {"images": torch.randn(6, 3, 32, 32, generator=g), "tokens": tokenizer(captions[:2] * 3)}
    preprocess = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}
    rows = token_merge_family(model, [3], tmp_path, tokenizer, preprocess, example, val, repeats=1)
    assert [(r["r"], r["runtime"]) for r in rows] == [
        (0, "PyTorch fp32"),
        (0, "ONNX Runtime fp32"),
        (3, "PyTorch fp32"),
        (3, "ONNX Runtime fp32"),
    ]
    base, merged = rows[0], rows[2]
    assert (base["tokens"], merged["tokens"]) == (17, 11) == (17, tokens_left(model.image_tower.backbone, 3))
    assert merged["image_flops"] < base["image_flops"]
    assert base["speedup"] == 1.0 and base["delta_r1_mean"] == 0.0
    # the merged graph (exported at batch 2, run at 6 and 1) computes what PyTorch does
    for row in rows[1::2]:
        assert row["max_abs_diff_vs_pytorch"] < 1e-4 and row["min_cos_vs_pytorch"] > 0.9999
        assert (tmp_path / "exports" / f"token_merge_r{row['r']}" / "export.json").is_file()
    assert rows[3]["val/r1_mean"] == pytest.approx(merged["val/r1_mean"])
    for row in rows:
        assert row["throughput_b1"] > 0 and row["throughput_b6"] > 0
    table = token_merge_table(rows, batch=6)
    assert table.count("\n| 3 |") == 2 and "Δ r1" in table


def test_a_tower_without_tokens_to_merge_is_a_config_error():
    trained = SimpleNamespace(
        model=SimpleNamespace(image_tower=ImageTower("resnet18_narrow")),
        cfg=OmegaConf.create({"model": {"image_tower": {"name": "resnet18_narrow"}}}),
    )
    with pytest.raises(ConfigError, match=r"token_merge\.r=\[2, 4\]: token merging needs a ViT image tower"):
        check_merge_tower(trained, [2, 4])
    with pytest.raises(ValueError, match="needs a ViT"):
        token_merged(trained.model, 2)
    assert merge_values(0) == [] and merge_values([8, 0, 2, 8]) == [2, 8]
