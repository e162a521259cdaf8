"""The text tower made prunable: its ``nn.TransformerEncoderLayer`` s converted, exactly, to
``PrunableEncoderLayer`` s with separate q, k, v projections (``nn.MultiheadAttention`` ties head_dim to
width / heads, so it cannot lose heads), inside a ``PrunableEncoder`` standing in for
``nn.TransformerEncoder``. The pruner (``compress/prune.py``) converts a model's text towers before it cuts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoglm_train.model.towers import TextTower

_ALL = slice(None)


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


def _sub_param(param: Tensor, index: tuple) -> nn.Parameter:
    """``param[index]`` as a new leaf parameter with the matching slice of its gradient, if any."""
    new = nn.Parameter(param.detach()[index].clone(), requires_grad=param.requires_grad)
    if param.grad is not None:
        new.grad = param.grad[index].clone()
    return new


def _linear(weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Linear:
    """An ``nn.Linear`` around these parameters (built on the meta device: nothing allocated twice)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight, lin.bias = weight, bias
    return lin
