"""Structured pruning of trained towers: whole attention heads, MLP hidden channels and the inner channels of
ResNet blocks are cut out and their modules rebuilt smaller, so the pruned model really has fewer parameters
and FLOPs (nothing is masked).

A *site* is one layer's set of structures of one kind, and each structure owns some weights; importance is
computed over exactly those:

    heads     text layer: its q, k, v rows (+ biases) and out_proj columns;
              timm ``Attention``: its rows in each of the q, k, v blocks of ``qkv`` (+ bias), ``proj`` columns
    mlp       text layer: ``linear1`` row (+ bias) and ``linear2`` column; timm ``Mlp``: the same
    channels  timm ResNet ``BasicBlock`` conv1 -> conv2, ``Bottleneck`` conv1 -> conv2 and conv2 -> conv3:
              the producing conv's output filter, its BatchNorm entry, the consuming conv's input slice.
              A block's output width is never cut, so every residual addition stays valid.

Importance:

    l1, l2    norm of the owned weights. For conv channels it is multiplied by |BN gamma|: the BatchNorm
              renormalizes the filter, so the filter's own scale says little about how loud the channel is,
              gamma does (the network-slimming criterion), and a zero gamma or a zero filter both score 0.
    taylor    |sum(w * grad)| over the owned parameters (BN gamma and beta included for channels): the
              first-order change of the loss when the structure is zeroed. Gradients come from the caller's
              calibration set (``accumulate_grads``).

Scope:

    per_layer every site keeps ``round((1 - ratio) * n)`` structures, at least one.
    global    per kind, the lowest ``round(ratio * total)`` structures across all sites go, at least one kept
              per site. Scores are first divided by the number of weights each structure owns (mean |w|, RMS,
              Taylor per weight) so that sites of different shapes compare; dividing by each site's mean
              score instead would make every site lose the same fraction and hide a layer whose weights
              are uniformly small, which is what a global budget is for.

The text tower's ``nn.TransformerEncoderLayer`` s are first converted, exactly, to ``PrunableEncoderLayer``
(``nn.MultiheadAttention`` ties head_dim to width / heads, so it cannot lose heads).
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp
from timm.models.resnet import BasicBlock, Bottleneck
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from autoglm_train.model.towers import TextTower

IMPORTANCES = ("l1", "l2", "taylor")
SCOPES = ("per_layer", "global")
KINDS = ("heads", "mlp", "channels")
_ALL = slice(None)


# --------------------------------------------------------------------------------------------------------
# text tower: a pre-norm encoder layer whose heads can be removed


class PrunableEncoderLayer(nn.Module):
    """The function of ``nn.TransformerEncoderLayer(norm_first=True, batch_first=True)``:

        x = x + dropout1(attn(norm1(x)));  x = x + dropout2(linear2(dropout(act(linear1(norm2(x))))))

    with separate q/k/v projections of ``heads * head_dim`` outputs, so that whole heads can be cut out while
    head_dim stays what training used (``nn.MultiheadAttention`` insists on head_dim = width / heads).
    """

    def __init__(
        self,
        width: int,
        heads: int,
        head_dim: int,
        hidden: int,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        activation: Callable[[Tensor], Tensor] = F.gelu,
        eps: float = 1e-5,
        bias: bool = True,
    ):
        super().__init__()
        self.heads, self.head_dim, self.attn_dropout = heads, head_dim, attn_dropout
        inner = heads * head_dim
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.q = nn.Linear(width, inner, bias=bias)
        self.k = nn.Linear(width, inner, bias=bias)
        self.v = nn.Linear(width, inner, bias=bias)
        self.out_proj = nn.Linear(inner, width, bias=bias)
        self.dropout1 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.linear1 = nn.Linear(width, hidden, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(hidden, width, bias=bias)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = activation

    @classmethod
    def from_torch_layer(cls, layer: nn.TransformerEncoderLayer) -> PrunableEncoderLayer:
        """The same function with the same weights. Norms, MLP and dropouts are taken over as they are;
        ``in_proj_weight`` is split into q, k, v. Gradients come along, so Taylor scores can be computed
        from gradients accumulated before the conversion."""
        attn = layer.self_attn
        if not layer.norm_first or not attn.batch_first:
            raise ValueError("only pre-norm (norm_first=True), batch_first=True encoder layers are supported")
        if not attn._qkv_same_embed_dim:
            raise ValueError("only self-attention with a packed in_proj_weight is supported")
        width = attn.embed_dim
        new = cls(width, attn.num_heads, attn.head_dim, layer.linear1.out_features, attn_dropout=attn.dropout)
        for name in ("norm1", "norm2", "linear1", "linear2", "dropout", "dropout1", "dropout2", "activation"):
            setattr(new, name, getattr(layer, name))
        for i, name in enumerate("qkv"):
            rows = slice(i * width, (i + 1) * width)
            bias = None if attn.in_proj_bias is None else _sub_param(attn.in_proj_bias, (rows,))
            setattr(new, name, _linear(_sub_param(attn.in_proj_weight, (rows,)), bias))
        out_bias = None if attn.out_proj.bias is None else _sub_param(attn.out_proj.bias, (_ALL,))
        new.out_proj = _linear(_sub_param(attn.out_proj.weight, (_ALL,)), out_bias)
        return new.train(layer.training)

    def forward(self, x: Tensor, src_key_padding_mask: Tensor | None = None) -> Tensor:
        x = x + self.dropout1(self._attention(self.norm1(x), src_key_padding_mask))
        return x + self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(self.norm2(x))))))

    def _attention(self, x: Tensor, padding: Tensor | None) -> Tensor:
        batch, length, _ = x.shape

        def split(t: Tensor) -> Tensor:
            return t.view(batch, length, self.heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.q(x)),
            split(self.k(x)),
            split(self.v(x)),
            attn_mask=_attention_mask(padding, x.dtype),
            dropout_p=self.attn_dropout if self.training else 0.0,
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim))

    def keep_heads(self, heads: Tensor) -> None:
        """Keep only these heads: their q/k/v rows and out_proj columns."""
        rows = _head_rows(heads, self.head_dim)
        self.q, self.k, self.v = (_linear_subset(lin, rows=rows) for lin in (self.q, self.k, self.v))
        self.out_proj = _linear_subset(self.out_proj, cols=rows)
        self.heads = len(heads)

    def keep_hidden(self, channels: Tensor) -> None:
        """Keep only these MLP hidden channels: linear1 rows (+ bias) and linear2 columns."""
        self.linear1 = _linear_subset(self.linear1, rows=channels)
        self.linear2 = _linear_subset(self.linear2, cols=channels)


class PrunableEncoder(nn.Module):
    """Stands in for ``nn.TransformerEncoder``, whose forward reads ``layers[0].self_attn`` for its fast-path
    checks, which a ``PrunableEncoderLayer`` does not have. Same call signature, so ``TextTower.forward``
    is unchanged."""

    def __init__(self, layers: Iterable[nn.Module], norm: nn.Module | None = None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm

    def forward(
        self,
        src: Tensor,
        mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool | None = None,
    ) -> Tensor:
        if mask is not None or is_causal:
            raise ValueError("PrunableEncoder supports key padding masks only")
        x = src
        for layer in self.layers:
            x = layer(x, src_key_padding_mask)
        return x if self.norm is None else self.norm(x)


def _attention_mask(padding: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A (B, 1, 1, N) SDPA mask from a (B, N) key padding mask (True = padding): boolean masks flip to
    True = may attend; float masks (additive, as ``nn.TransformerEncoder`` passes them on) pass through."""
    if padding is None:
        return None
    if padding.dtype == torch.bool:
        return ~padding[:, None, None, :]
    return padding[:, None, None, :].to(dtype)


def convert_text_tower(tower: TextTower) -> TextTower:
    """Swap the tower's ``nn.TransformerEncoder`` for a ``PrunableEncoder`` of converted layers, in place.
    Exact (outputs equal to float tolerance) and idempotent."""
    encoder = tower.encoder
    if isinstance(encoder, PrunableEncoder):
        return tower
    if not isinstance(encoder, nn.TransformerEncoder):
        raise TypeError(f"expected an nn.TransformerEncoder, got {type(encoder).__name__}")
    layers = [PrunableEncoderLayer.from_torch_layer(layer) for layer in encoder.layers]
    tower.encoder = PrunableEncoder(layers, encoder.norm).train(encoder.training)
    return tower


def convert_text_towers(model: nn.Module) -> nn.Module:
    """``convert_text_tower`` on every ``TextTower`` in ``model`` (``model`` itself included)."""
    for tower in [m for m in model.modules() if isinstance(m, TextTower)]:
        convert_text_tower(tower)
    return model


# --------------------------------------------------------------------------------------------------------
# rebuilding modules with a subset of their rows / columns / channels


def _sub_param(param: Tensor, index: tuple) -> nn.Parameter:
    """``param[index]`` as a new leaf parameter with the matching slice of its gradient, if any."""
    new = nn.Parameter(param.detach()[index].clone(), requires_grad=param.requires_grad)
    if param.grad is not None:
        new.grad = param.grad[index].clone()
    return new


def _ix(index: Tensor | None) -> Tensor | slice:
    return _ALL if index is None else index


def _linear(weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Linear:
    """An ``nn.Linear`` around these parameters (built on the meta device: nothing allocated twice)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight, lin.bias = weight, bias
    return lin


def _linear_subset(lin: nn.Linear, rows: Tensor | None = None, cols: Tensor | None = None) -> nn.Linear:
    """The linear map restricted to these output rows and input columns."""
    weight = _sub_param(lin.weight, (_ix(rows), _ix(cols)))
    bias = None if lin.bias is None else _sub_param(lin.bias, (_ix(rows),))
    return _linear(weight, bias).train(lin.training)


def _conv_subset(conv: nn.Conv2d, out_idx: Tensor | None = None, in_idx: Tensor | None = None) -> nn.Conv2d:
    """The (ungrouped) convolution restricted to these output filters and input channels."""
    weight = _sub_param(conv.weight, (_ix(out_idx), _ix(in_idx)))
    new = nn.Conv2d(
        weight.shape[1],
        weight.shape[0],
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device="meta",
    )
    new.weight = weight
    new.bias = None if conv.bias is None else _sub_param(conv.bias, (_ix(out_idx),))
    return new.train(conv.training)


def _bn_subset(bn: nn.BatchNorm2d, idx: Tensor) -> nn.BatchNorm2d:
    """The BatchNorm restricted to these channels: affine parameters and running statistics; eps, momentum
    and any fused activation (timm's BatchNormAct2d) kept, since it is a copy."""
    new = copy.deepcopy(bn)
    new.num_features = len(idx)
    if bn.affine:
        new.weight, new.bias = _sub_param(bn.weight, (idx,)), _sub_param(bn.bias, (idx,))
    if bn.track_running_stats:
        new.running_mean = bn.running_mean[idx].clone()
        new.running_var = bn.running_var[idx].clone()
    return new


def _norm_sliceable(norm: nn.Module | None) -> bool:
    return norm is None or isinstance(norm, nn.Identity | nn.LayerNorm)


def _norm_subset(norm: nn.Module | None, idx: Tensor) -> nn.Module | None:
    """A LayerNorm over fewer features, for timm's optional inner norms (``scale_attn_norm`` /
    ``scale_mlp_norm``). Not function-preserving there (the statistics change; fine-tuning after pruning
    absorbs it); Identity/None pass through."""
    if not isinstance(norm, nn.LayerNorm):
        return norm
    new = copy.deepcopy(norm)
    new.normalized_shape = (len(idx),)
    if norm.weight is not None:
        new.weight = _sub_param(norm.weight, (idx,))
    if norm.bias is not None:
        new.bias = _sub_param(norm.bias, (idx,))
    return new


def _head_rows(heads: Tensor, head_dim: int) -> Tensor:
    """Row indices of these heads in a (heads * head_dim)-row projection."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).reshape(-1)


# --------------------------------------------------------------------------------------------------------
# sites: what can be pruned, what each structure owns, how to cut it


@dataclass
class Owned:
    """Weights owned by a site's structures: along ``dim`` of ``param`` (optionally only its
    ``[start, start + length)`` part, e.g. the q block of timm's fused qkv), structure i owns the i-th of
    ``size`` equal consecutive chunks."""

    param: nn.Parameter
    dim: int
    start: int = 0
    length: int | None = None

    def per_structure(self, tensor: Tensor, size: int) -> Tensor:
        """``tensor`` (the parameter, its gradient or their product) as (size, -1): a row per structure."""
        if self.length is not None:
            tensor = tensor.narrow(self.dim, self.start, self.length)
        return tensor.movedim(self.dim, 0).reshape(size, -1)


@dataclass
class Site:
    """One layer's structures of one kind: how many, the weights they own, and ``keep(indices)`` which
    rebuilds the layer's modules keeping only those structures. ``bn`` is the BatchNorm whose gamma scales
    conv channel norms (and whose gamma/beta count for Taylor)."""

    kind: str
    name: str
    size: int
    owned: list[Owned]
    keep: Callable[[Tensor], None]
    bn: nn.BatchNorm2d | None = None

    def all_owned(self) -> list[Owned]:
        """Everything the structures own, BatchNorm affine parameters included."""
        if self.bn is None or not self.bn.affine:
            return list(self.owned)
        return [*self.owned, Owned(self.bn.weight, 0), Owned(self.bn.bias, 0)]

    def weights_per_structure(self) -> int:
        return sum(o.per_structure(o.param.detach(), self.size).shape[1] for o in self.owned)


def _owned_linear(lin: nn.Linear, dim: int, start: int = 0, length: int | None = None) -> list[Owned]:
    """A linear layer's weight along ``dim`` (0: output rows, 1: input columns), and its bias with rows."""
    owned = [Owned(lin.weight, dim, start, length)]
    if dim == 0 and lin.bias is not None:
        owned.append(Owned(lin.bias, 0, start, length))
    return owned


def _text_layer_sites(name: str, layer: PrunableEncoderLayer) -> list[Site]:
    heads = Site(
        "heads",
        f"{name}.attn",
        layer.heads,
        [*_owned_linear(layer.q, 0), *_owned_linear(layer.k, 0), *_owned_linear(layer.v, 0)]
        + _owned_linear(layer.out_proj, 1),
        layer.keep_heads,
    )
    mlp_owned = _owned_linear(layer.linear1, 0) + _owned_linear(layer.linear2, 1)
    mlp = Site("mlp", f"{name}.mlp", layer.linear1.out_features, mlp_owned, layer.keep_hidden)
    return [heads, mlp]


def _timm_attention_sites(name: str, attn: Attention) -> list[Site]:
    """Heads of a timm ``Attention``: ``qkv`` rows are laid out (3, num_heads, head_dim), and forward
    reshapes with ``num_heads``/``head_dim``/``attn_dim``, so cutting rows and lowering num_heads suffices."""
    inner = attn.num_heads * attn.head_dim
    gate = getattr(attn, "gate", None)
    if not (isinstance(attn.qkv, nn.Linear) and isinstance(attn.proj, nn.Linear)):
        return []
    if attn.qkv.out_features != 3 * inner or not _norm_sliceable(getattr(attn, "norm", None)):
        return []
    owned = [o for i in range(3) for o in _owned_linear(attn.qkv, 0, i * inner, inner)]
    owned += _owned_linear(attn.proj, 1) + ([] if gate is None else _owned_linear(gate, 0))

    def keep(heads: Tensor) -> None:
        rows = _head_rows(heads, attn.head_dim)
        attn.qkv = _linear_subset(attn.qkv, rows=torch.cat([rows + i * inner for i in range(3)]))
        attn.proj = _linear_subset(attn.proj, cols=rows)
        if getattr(attn, "gate", None) is not None:
            attn.gate = _linear_subset(attn.gate, rows=rows)
        if hasattr(attn, "norm"):
            attn.norm = _norm_subset(attn.norm, rows)
        attn.num_heads = len(heads)
        if hasattr(attn, "attn_dim"):
            attn.attn_dim = len(heads) * attn.head_dim

    return [Site("heads", name, attn.num_heads, owned, keep)]


def _timm_mlp_sites(name: str, mlp: Mlp) -> list[Site]:
    if not (isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear)):
        return []  # the 1x1-conv variant
    if not _norm_sliceable(getattr(mlp, "norm", None)):
        return []

    def keep(channels: Tensor) -> None:
        mlp.fc1 = _linear_subset(mlp.fc1, rows=channels)
        mlp.norm = _norm_subset(mlp.norm, channels)
        mlp.fc2 = _linear_subset(mlp.fc2, cols=channels)

    owned = _owned_linear(mlp.fc1, 0) + _owned_linear(mlp.fc2, 1)
    return [Site("mlp", name, mlp.fc1.out_features, owned, keep)]


def _conv_pair_sites(
    name: str, block: nn.Module, producer: str, bn: str, consumer: str, aa: bool
) -> list[Site]:
    """Channels flowing ``block.<producer>`` -> ``block.<bn>`` -> (activation, drop block, ``aa`` when
    ``aa``) -> ``block.<consumer>``. Skipped when a grouped conv or a real anti-aliasing layer (which has
    its own channel count) sits on the path."""
    first, norm, second = getattr(block, producer), getattr(block, bn), getattr(block, consumer)
    if not (type(first) is nn.Conv2d and type(second) is nn.Conv2d and isinstance(norm, nn.BatchNorm2d)):
        return []
    if first.groups != 1 or second.groups != 1:
        return []
    if aa and not isinstance(getattr(block, "aa", None), nn.Identity | None):
        return []

    def keep(channels: Tensor) -> None:
        # read the modules now, not at collection time: a Bottleneck's conv2 is cut by two sites
        setattr(block, producer, _conv_subset(getattr(block, producer), out_idx=channels))
        setattr(block, bn, _bn_subset(getattr(block, bn), channels))
        setattr(block, consumer, _conv_subset(getattr(block, consumer), in_idx=channels))

    owned = [Owned(first.weight, 0), Owned(second.weight, 1)]
    if first.bias is not None:
        owned.append(Owned(first.bias, 0))
    return [Site("channels", f"{name}.{producer}", first.out_channels, owned, keep, bn=norm)]


def _resnet_block_sites(name: str, block: nn.Module) -> list[Site]:
    if isinstance(block, BasicBlock):
        return _conv_pair_sites(name, block, "conv1", "bn1", "conv2", aa=True)
    return _conv_pair_sites(name, block, "conv1", "bn1", "conv2", aa=False) + _conv_pair_sites(
        name, block, "conv2", "bn2", "conv3", aa=True
    )


def find_sites(model: nn.Module, kinds: Iterable[str] = KINDS) -> list[Site]:
    """Every prunable site of these kinds in ``model``. Text towers must be converted first
    (``convert_text_towers``); ``prune_model`` does that."""
    kinds = set(kinds)
    sites: list[Site] = []
    for name, module in model.named_modules():
        if isinstance(module, PrunableEncoderLayer):
            sites += _text_layer_sites(name, module)
        elif isinstance(module, Attention):
            sites += _timm_attention_sites(name, module)
        elif isinstance(module, Mlp):
            sites += _timm_mlp_sites(name, module)
        elif isinstance(module, BasicBlock | Bottleneck):
            sites += _resnet_block_sites(name, module)
    return [s for s in sites if s.kind in kinds]


# --------------------------------------------------------------------------------------------------------
# importance and selection


def structure_scores(site: Site, importance: str) -> Tensor:
    """One score per structure of the site (higher = more important); see the module docstring."""
    with torch.no_grad():
        if importance == "taylor":
            return _taylor_scores(site)
        power = 1 if importance == "l1" else 2
        total = sum(
            o.per_structure(o.param.detach().float(), site.size).abs().pow(power).sum(1) for o in site.owned
        )
        score = total if power == 1 else total.sqrt()
        if site.bn is not None and site.bn.affine:
            score = score * site.bn.weight.detach().float().abs()
        return score.cpu()


def _taylor_scores(site: Site) -> Tensor:
    total = torch.zeros(site.size)
    for o in site.all_owned():
        if o.param.grad is not None:
            product = (o.param.detach() * o.param.grad).float()
            total += o.per_structure(product, site.size).sum(1).cpu()
    return total.abs()


def _has_grads(sites: Iterable[Site]) -> bool:
    return any(o.param.grad is not None for s in sites for o in s.all_owned())


def taylor_scores_from_grads(model: nn.Module, targets: Iterable[str] = KINDS) -> dict[str, Tensor]:
    """Taylor scores ``|sum(w * grad)|`` per structure, keyed by site name, from the ``.grad`` already on
    the parameters (``accumulate_grads``). Converts text towers in place (exact) so that the names are
    those ``prune_model`` prunes."""
    sites = find_sites(convert_text_towers(model), targets)
    if not _has_grads(sites):
        raise ValueError(
            "no gradients on the prunable weights: run accumulate_grads on a calibration set first"
        )
    return {s.name: _taylor_scores(s) for s in sites}


def _keep_count(n: int, ratio: float) -> int:
    return max(1, min(n, round((1 - ratio) * n)))


def _top(scores: Tensor, k: int) -> Tensor:
    """Indices of the k highest scores, ascending; ties keep the earlier structure."""
    return torch.argsort(scores, descending=True, stable=True)[:k].sort().values


def _global_keep(scores: list[Tensor], ratio: float) -> list[Tensor]:
    """Remove the lowest ``round(ratio * total)`` scores across all sites, never a site's last one."""
    flat = torch.cat(scores)
    owner = [(i, j) for i, s in enumerate(scores) for j in range(len(s))]
    left = [len(s) for s in scores]
    removed: list[set[int]] = [set() for _ in scores]
    budget = round(ratio * len(flat))
    for position in torch.argsort(flat, stable=True).tolist():
        if budget == 0:
            break
        site, index = owner[position]
        if left[site] > 1:
            removed[site].add(index)
            left[site] -= 1
            budget -= 1
    return [
        torch.tensor([j for j in range(len(s)) if j not in gone])
        for s, gone in zip(scores, removed, strict=True)
    ]


def _per_weight(score: Tensor, site: Site, importance: str) -> Tensor:
    """Score on a per-weight scale (mean |w|, RMS, Taylor per weight): comparable across site shapes."""
    n = site.weights_per_structure()
    return score / (math.sqrt(n) if importance == "l2" else n)


def select_structures(
    sites: list[Site], scores: list[Tensor], ratio: float, scope: str, importance: str
) -> list[Tensor]:
    """For each site, the sorted indices of the structures to keep."""
    if scope == "per_layer":
        return [_top(s, _keep_count(site.size, ratio)) for site, s in zip(sites, scores, strict=True)]
    keeps: list[Tensor | None] = [None] * len(sites)
    for kind in KINDS:
        members = [i for i, site in enumerate(sites) if site.kind == kind]
        if not members:
            continue
        normalized = [_per_weight(scores[i], sites[i], importance) for i in members]
        for i, keep in zip(members, _global_keep(normalized, ratio), strict=True):
            keeps[i] = keep
    return keeps


# --------------------------------------------------------------------------------------------------------
# public entry points


def _validate(
    ratio: float, importance: str, scope: str, targets: tuple[str, ...], grads_available: bool
) -> None:
    if not isinstance(ratio, numbers.Real) or not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")
    if importance not in IMPORTANCES:
        raise ValueError(f"importance must be one of {IMPORTANCES}, got {importance!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    unknown = [t for t in targets if t not in KINDS]
    if unknown or not targets:
        raise ValueError(f"targets must be a non-empty subset of {KINDS}, got {targets!r}")
    if importance == "taylor" and not grads_available:
        raise ValueError(
            "importance='taylor' needs gradients: run accumulate_grads on a calibration set and pass "
            "grads_available=True"
        )


def prune_model(
    model: nn.Module,
    ratio: float,
    importance: str = "l1",
    scope: str = "per_layer",
    targets: Iterable[str] = KINDS,
    grads_available: bool = False,
) -> dict:
    """Prune, in place, every tower found in ``model`` (a DualEncoder, a tower, a bare timm backbone):
    text-tower and ViT heads and MLP channels, ResNet inner block channels.

    Returns ``{"params_before", "params_after", "removed": {kind: n}, "layers": {site: (before, after)}}``.
    Ratio 0 leaves every module untouched (the text tower is still converted, exactly).
    """
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    _validate(ratio, importance, scope, targets, grads_available)
    params_before = count_params(model)
    sites = find_sites(convert_text_towers(model), targets)
    if importance == "taylor" and not _has_grads(sites):
        raise ValueError("importance='taylor' but no prunable weight has a .grad: run accumulate_grads first")
    scores = [structure_scores(site, importance) for site in sites]
    keeps = select_structures(sites, scores, ratio, scope, importance)
    removed = dict.fromkeys(KINDS, 0)
    layers = {}
    for site, keep in zip(sites, keeps, strict=True):
        removed[site.kind] += site.size - len(keep)
        layers[site.name] = (site.size, len(keep))
        if len(keep) < site.size:
            site.keep(keep.to(next(iter(site.owned)).param.device))
    return {
        "params_before": params_before,
        "params_after": count_params(model),
        "removed": removed,
        "layers": layers,
    }


def accumulate_grads(
    model: nn.Module, loss_fn: Callable[[nn.Module, object], Tensor], batches: Iterable
) -> float:
    """Zero the gradients, then sum ``loss_fn(model, batch).backward()`` over a calibration set into
    ``.grad`` (for ``importance="taylor"``). Runs in eval mode, restored afterwards: no dropout noise, and
    BatchNorm uses, rather than overwrites, the trained running statistics. Returns the mean loss."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    model.zero_grad(set_to_none=True)
    total, count = 0.0, 0
    try:
        with torch.enable_grad():
            for batch in batches:
                loss = loss_fn(model, batch)
                loss.backward()
                total, count = total + float(loss.detach()), count + 1
    finally:
        for module, training in flags.items():
            module.training = training
    if count == 0:
        raise ValueError("accumulate_grads got no calibration batches")
    return total / count


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch counts the CUDA attention kernels but not the CPU one, which SDPA (ours, timm's, nn.MHA's) uses here
_EXTRA_FLOP_FORMULAS = (
    {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    else {}
)


def estimate_flops(
    model: nn.Module, example_inputs: Tensor | tuple, forward: Callable[..., object] | None = None
) -> int:
    """FLOPs of one forward on ``example_inputs`` (a tensor, or a tuple of positional arguments), counted by
    ``FlopCounterMode`` in eval mode without grad (mode restored; BatchNorm statistics untouched). Counts
    matmuls, convolutions and fused attention (the CPU kernel too); not norms or activations. ``forward``
    (default: ``model`` itself) is what runs on the inputs, e.g. both encoders of a dual encoder."""
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    flags = {m: m.training for m in model.modules()}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    # nn.MultiheadAttention's fused inference kernel has no FLOP formula (counts 0): use the plain path
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter:
            (forward or model)(*inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for module, training in flags.items():
            module.training = training
    return int(counter.get_total_flops())
