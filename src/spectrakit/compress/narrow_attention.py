"""An attention layer whose heads are narrower than the model's: MoDeGPT's compressed attention.

MoDeGPT (:mod:`spectrakit.compress.modegpt`) shrinks two widths of every head ``h``
independently: the query/key width ``d_qk`` (the Q·K pair) and the value/output width
``d_vo`` (the V·O pair). The layer computes, with ``g(h)`` the key/value head of query head
``h`` (grouped-query attention when there are fewer key/value heads):

.. math::  q_h = W_{q,h} x + b_{q,h}, \\quad k_g = W_{k,g} x + b_{k,g}, \\quad v_g = W_{v,g} x, \\qquad
           y = b_o + \\sum_h W_{o,h} \\, \\mathrm{softmax}\\big(s \\cdot \\mathrm{rope}(q_h)\\,
           \\mathrm{rope}(k_{g(h)})^T + M\\big) \\, v_{g(h)}

``s`` stays the dense layer's scale (``1/√d_head``): the narrower ``q_h·k_g`` approximates the
full dot product, so it must not be rescaled. With rotary embeddings, the ``d_qk`` query/key
dimensions of key/value head ``g`` are rotary pairs of the dense head kept whole: the
buffer ``rotary_index[g]`` lists, for each kept dimension, the dense dimension whose angle
it takes (``[S, S + d_head/2]`` for the kept pair indices ``S``), so ``rotate_half`` on the
narrow vector pairs dimension ``j`` with ``j + d_qk/2`` exactly as the dense head pairs ``i``
with ``i + d_head/2``. The model's own rotary module still computes the angles, so any rope
scaling it applies is kept. The attention kernel is the model's
(``config._attn_implementation``: eager, sdpa, …) and the key/value cache is its cache.

>>> import torch
>>> layer = NarrowAttention(16, heads=2, kv_heads=2, qk_dim=4, vo_dim=3, scaling=0.25)
>>> layer(torch.randn(1, 5, 16))[0].shape
torch.Size([1, 5, 16])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(s·q kᵀ + M) v over ``[batch, heads, tokens, dim]`` (keys and values repeated per
    group); a causal mask when the model passes none (its sdpa convention)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = (query @ key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    elif query.shape[-2] > 1:
        causal = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device)
        causal = causal.tril(key.shape[-2] - query.shape[-2])
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    weights = F.softmax(scores, dim=-1, dtype=torch.promote_types(query.dtype, torch.float32)).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return (weights @ value).transpose(1, 2).contiguous(), weights


class NarrowAttention(nn.Module):
    """Self-attention with ``heads`` query heads of width ``qk_dim`` over ``kv_heads``
    key/value heads, values of width ``vo_dim`` (the module docstring).

    Args:
        hidden_size: the model width (input and output).
        heads: query heads.
        kv_heads: key/value heads (``heads`` must be a multiple).
        qk_dim: the query/key width per head (even with ``rotary``).
        vo_dim: the value/output width per head.
        scaling: the dense layer's score scale.
        q_bias, k_bias, o_bias: whether those projections have a bias (the value bias is
            folded into ``o``'s: attention weights sum to one).
        head_dim: the dense head width, whose rotary angles ``rotary_index`` selects from.
        rotary: whether the model passes rotary ``position_embeddings``.
        layer_idx: the layer's index in the model's cache.
        attention_dropout: dropout on the attention weights in training.
        output_dropout: dropout on the output in training (GPT-2's residual dropout).
        config: the model's config, for its attention kernel (``_attn_implementation``).
        device: where the projections are created.
        dtype: the projections' dtype.
    """

    rotary_index: torch.Tensor

    def __init__(self, hidden_size: int, heads: int, kv_heads: int, qk_dim: int, vo_dim: int, scaling: float, *,
                 q_bias: bool = False, k_bias: bool = False, o_bias: bool = False, head_dim: int | None = None,
                 rotary: bool = False, layer_idx: int | None = None, attention_dropout: float = 0.0,
                 output_dropout: float = 0.0, config: Any = None, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.hidden_size, self.heads, self.kv_heads = hidden_size, heads, kv_heads
        self.qk_dim, self.vo_dim, self.scaling = qk_dim, vo_dim, scaling
        self.head_dim, self.rotary, self.layer_idx = head_dim or qk_dim, rotary, layer_idx
        self.num_key_value_groups = heads // kv_heads  # read by transformers' attention kernels
        self.is_causal = True
        self.attention_dropout, self.output_dropout = attention_dropout, output_dropout
        self.config = config
        self.q_proj = nn.Linear(hidden_size, heads * qk_dim, bias=q_bias, **factory)
        self.k_proj = nn.Linear(hidden_size, kv_heads * qk_dim, bias=k_bias, **factory)
        self.v_proj = nn.Linear(hidden_size, kv_heads * vo_dim, bias=False, **factory)
        self.o_proj = nn.Linear(heads * vo_dim, hidden_size, bias=o_bias, **factory)
        index = torch.arange(qk_dim, device=device).repeat(kv_heads, 1)
        self.register_buffer("rotary_index", index)  # saved with the weights: it is part of the layer

    def extra_repr(self) -> str:
        """The widths, for ``print(model)``."""
        return (f"hidden_size={self.hidden_size}, heads={self.heads}, kv_heads={self.kv_heads}, "
                f"qk_dim={self.qk_dim}, vo_dim={self.vo_dim}, rotary={self.rotary}")

    def spec(self) -> dict[str, Any]:
        """The constructor's arguments (but ``config``), as saved by ``save_compressed``."""
        return {"hidden_size": self.hidden_size, "heads": self.heads, "kv_heads": self.kv_heads,
                "qk_dim": self.qk_dim, "vo_dim": self.vo_dim, "scaling": self.scaling,
                "q_bias": self.q_proj.bias is not None, "k_bias": self.k_proj.bias is not None,
                "o_bias": self.o_proj.bias is not None, "head_dim": self.head_dim, "rotary": self.rotary,
                "layer_idx": self.layer_idx, "attention_dropout": self.attention_dropout,
                "output_dropout": self.output_dropout}

    def _rope(self, states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``states`` ``[batch, heads, tokens, qk_dim]`` by the kept dimensions' angles."""
        groups = states.shape[1] // self.kv_heads
        index = self.rotary_index.repeat_interleave(groups, dim=0)  # [heads, qk_dim]
        if cos.ndim == 2:
            cos, sin = cos[None], sin[None]
        # cos: [batch, tokens, head_dim] -> [batch, heads, tokens, qk_dim]
        cos = cos[:, None, :, :].expand(-1, index.shape[0], -1, -1)
        sin = sin[:, None, :, :].expand(-1, index.shape[0], -1, -1)
        gather = index[None, :, None, :].expand(cos.shape[0], -1, cos.shape[2], -1)
        cos, sin = cos.gather(-1, gather).to(states.dtype), sin.gather(-1, gather).to(states.dtype)
        return states * cos + _rotate_half(states) * sin

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, cache: Any = None, past_key_values: Any = None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(y, attention weights or None)`` for ``hidden_states`` ``[batch, tokens, hidden_size]``.

        Args:
            hidden_states: the layer input.
            position_embeddings: ``(cos, sin)`` of the dense head width, from the model's
                rotary module (required with ``rotary``).
            attention_mask: the model's mask for its attention kernel.
            cache, past_key_values: the model's key/value cache (either name), updated in place.
            kwargs: passed on to the attention kernel and the cache.
        """
        batch, tokens = hidden_states.shape[:-1]
        query = self.q_proj(hidden_states).view(batch, tokens, self.heads, self.qk_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch, tokens, self.kv_heads, self.qk_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, tokens, self.kv_heads, self.vo_dim).transpose(1, 2)
        if self.rotary:
            if position_embeddings is None:
                raise ValueError("NarrowAttention(rotary=True) needs position_embeddings=(cos, sin)")
            cos, sin = position_embeddings
            query, key = self._rope(query, cos, sin), self._rope(key, cos, sin)
        cache = cache if cache is not None else past_key_values
        if cache is not None and hasattr(cache, "update"):
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        implementation = getattr(self.config, "_attn_implementation", None) or "eager"
        kernel: Any = _eager_attention
        if implementation != "eager":
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            kernel = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, _eager_attention)
        dropout = self.attention_dropout if self.training else 0.0
        output, weights = kernel(self, query, key, value, attention_mask, scaling=self.scaling, dropout=dropout,
                                 **kwargs)
        output = self.o_proj(output.reshape(batch, tokens, self.heads * self.vo_dim))
        return F.dropout(output, p=self.output_dropout, training=self.training), weights
