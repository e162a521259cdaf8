"""Token merging at inference for timm ViT image towers (ToMe: Bolya et al., "Token Merging: Your ViT but
Faster", ICLR 2023), written here from the paper's description.

In every block, between attention and the MLP, ``r`` tokens are merged away by bipartite soft matching:
the mergeable tokens (all but the prefix: class and register tokens, never merged) are split alternately
into sets A and B; each A token's most similar B token is its partner, the similarity being the cosine of
the attention keys averaged over heads; the ``r`` A tokens with the most similar partners are merged into
them, as averages weighted by token size (how many patches a token stands for), and sizes add up. The
attention that follows adds ``log(size)`` to its logits (proportional attention), so a merged token weighs
as the patches it replaced; average pooling at the end is size-weighted, class-token pooling is unchanged.
No weights change: a trained tower runs as it is, with fewer tokens in each later block.

``r`` is fixed when the tower is set up (``apply_token_merging``); the token counts per block then follow
from the input size, so the merged tower exports to ONNX with the same dynamic batch as the plain one
(argsort, gather and scatter-add are ordinary ONNX ops). Only the tower's ``forward`` (pooled features:
what the dual encoder embeds) merges; ``forward_features`` (the token grid the fusion stage reads) stays
the unmerged one.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

POOLS = ("token", "avg", "max", "avgmax")  # timm's global_pool values a merged tower pools


def unsupported_reason(backbone: nn.Module) -> str | None:
    """Why token merging cannot run in ``backbone`` (a timm model), or None where it can: a timm
    ``VisionTransformer`` whose blocks are timm's pre-norm ``Block`` with its standard ``Attention``, pooled
    by class token or (weighted) average/max, not by an attention-pooling head."""
    if not isinstance(backbone, VisionTransformer):
        return f"needs a ViT image tower (timm VisionTransformer); this one is {type(backbone).__name__}"
    blocks = {type(b).__name__ for b in backbone.blocks if type(b) is not Block}
    if blocks:
        return f"needs timm's vision_transformer.Block blocks; these are {', '.join(sorted(blocks))}"
    attentions = {type(b.attn).__name__ for b in backbone.blocks if type(b.attn) is not Attention}
    if attentions:
        return f"needs timm's Attention in the blocks; these have {', '.join(sorted(attentions))}"
    if getattr(backbone, "attn_pool", None) is not None:
        return "does not support an attention-pooling head (MAP); class-token or average pooling only"
    if backbone.global_pool not in POOLS:
        return f"needs global_pool in {', '.join(POOLS)}; this tower has {backbone.global_pool!r}"
    return None


def merge_counts(tokens: int, prefix: int, r: int, depth: int) -> list[int]:
    """Tokens merged away in each of ``depth`` blocks: ``r``, or fewer where fewer than ``2 r`` mergeable
    tokens are left (set A can give at most half of them, and B keeps at least as many)."""
    counts = []
    for _ in range(depth):
        counts.append(min(r, (tokens - prefix) // 2))
        tokens -= counts[-1]
    return counts


def bipartite_merge(
    x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int, prefix: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``(B, N, C)`` with token sizes ``(B, N, 1)`` and merge keys ``(B, N, D)`` -> ``(B, N - r, C)``
    and their sizes: the first ``prefix`` tokens as they are, then the A tokens left unmerged, then B with
    the ``r`` most similar A tokens averaged into their partners (size-weighted)."""
    keep_x, rest_x = x[:, :prefix], x[:, prefix:]
    keep_size, rest_size = size[:, :prefix], size[:, prefix:]
    keys = F.normalize(metric[:, prefix:], dim=-1)
    similarity = keys[:, 0::2] @ keys[:, 1::2].transpose(1, 2)  # (B, |A|, |B|): cosine
    best, partner = similarity.max(dim=-1)  # each A token's closest B token
    order = best.argsort(dim=-1, descending=True)
    merged, unmerged = order[:, :r], order[:, r:]
    destination = partner.gather(1, merged)  # (B, r): where each merged A token goes

    a_x, b_x = rest_x[:, 0::2], rest_x[:, 1::2]
    a_size, b_size = rest_size[:, 0::2], rest_size[:, 1::2]
    width = x.shape[-1]
    # sums of size * value and of sizes over each B token and the A tokens merged into it
    b_sum = (b_x * b_size).scatter_add(1, _rows(destination, width), _take(a_x * a_size, merged))
    b_total = b_size.scatter_add(1, destination.unsqueeze(-1), _take(a_size, merged))
    out = torch.cat([keep_x, _take(a_x, unmerged), b_sum / b_total], dim=1)
    return out, torch.cat([keep_size, _take(a_size, unmerged), b_total], dim=1)


def _rows(index: torch.Tensor, width: int) -> torch.Tensor:
    return index.unsqueeze(-1).expand(-1, -1, width)


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` ``(B, K)`` of ``t`` ``(B, N, C)``."""
    return t.gather(1, _rows(index, t.shape[-1]))


def attention(
    attn: Attention, x: torch.Tensor, size: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """timm ``Attention`` on ``x`` (the same computation, from its own layers), with ``log(size)`` added to
    the logits where tokens have sizes; also returns the keys averaged over heads ``(B, N, head_dim)``."""
    batch, tokens, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = None if size is None else size.log().transpose(1, 2).unsqueeze(1)  # (B, 1, 1, N): per key
    dropout = attn.attn_drop.p if attn.training else 0.0
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        out = attn.attn_drop(logits.softmax(dim=-1)) @ v
    out = attn.norm(out.transpose(1, 2).reshape(batch, tokens, attn.num_heads * attn.head_dim))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), k.mean(dim=1)


def merging_block(
    block: Block, x: torch.Tensor, size: torch.Tensor | None, r: int, prefix: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One timm ``Block``: attention, then ``r`` tokens merged away, then the MLP on what is left."""
    y, keys = attention(block.attn, block.norm1(x), size)
    x = x + block.drop_path1(block.ls1(y))
    if r > 0:
        if size is None:  # every token one patch until the first merge
            size = x.new_ones(x.shape[0], x.shape[1], 1)
        x, size = bipartite_merge(x, size, keys, r, prefix)
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x)))), size


def weighted_pool(vit: VisionTransformer, x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """timm's ``global_pool`` over merged tokens: class token as it is; averages weighted by size."""
    pool = vit.global_pool
    if pool == "token" or size is None:
        return vit.pool(x)
    if not vit.pool_include_prefix:
        x, size = x[:, vit.num_prefix_tokens :], size[:, vit.num_prefix_tokens :]
    mean = (x * size).sum(dim=1) / size.sum(dim=1)
    if pool == "avg":
        return mean
    if pool == "max":
        return x.amax(dim=1)
    return 0.5 * (x.amax(dim=1) + mean)  # avgmax


class TokenMerging:
    """Mixed into a ``VisionTransformer`` 's class by ``apply_token_merging``: ``forward`` merges
    ``token_merge_r`` tokens per block (weights, state dict and every other method as they were)."""

    token_merge_r: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        counts = merge_counts(x.shape[1], self.num_prefix_tokens, self.token_merge_r, len(self.blocks))
        size = None
        for block, r in zip(self.blocks, counts, strict=True):
            x, size = merging_block(block, x, size, r, self.num_prefix_tokens)
        x = weighted_pool(self, self.norm(x), size)
        return self.head(self.head_drop(self.fc_norm(x)))


@functools.cache
def _merging_class(cls: type) -> type:
    return type(f"TokenMerging{cls.__name__}", (TokenMerging, cls), {"__module__": __name__})


def apply_token_merging(backbone: nn.Module, r: int) -> nn.Module:
    """``backbone`` (a timm ViT, changed in place) merging ``r`` tokens per block in ``forward``; ``r = 0``
    runs the same blocks with nothing merged. Raises ``ValueError`` (with ``unsupported_reason``) else."""
    reason = unsupported_reason(backbone)
    if reason:
        raise ValueError(f"token merging {reason}")
    if not isinstance(backbone, TokenMerging):
        backbone.__class__ = _merging_class(type(backbone))
    backbone.token_merge_r = int(r)
    return backbone


def image_backbone(model: nn.Module) -> nn.Module | None:
    """The timm model inside a dual encoder's image tower (``ImageTower.backbone``), or None."""
    return getattr(getattr(model, "image_tower", None), "backbone", None)


def check_token_merging(model: nn.Module) -> str | None:
    """Why a dual encoder's image tower cannot merge tokens, or None where it can."""
    backbone = image_backbone(model)
    if backbone is None:
        return (
            "needs a ViT image tower (timm VisionTransformer); "
            f"this one is {type(getattr(model, 'image_tower', model)).__name__}"
        )
    return unsupported_reason(backbone)


def token_merged(model: nn.Module, r: int) -> nn.Module:
    """A copy of a dual encoder whose image tower merges ``r`` tokens per block."""
    merged = copy.deepcopy(model)
    backbone = image_backbone(merged)
    if backbone is None:
        raise ValueError(f"token merging {check_token_merging(model)}")
    apply_token_merging(backbone, r)
    return merged.eval()


def tokens_left(backbone: nn.Module, r: int) -> int:
    """Tokens (prefix included) that reach the last block's MLP with ``r`` merged per block."""
    tokens = backbone.patch_embed.num_patches + backbone.num_prefix_tokens
    return tokens - sum(merge_counts(tokens, backbone.num_prefix_tokens, r, len(backbone.blocks)))
