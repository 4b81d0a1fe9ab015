"""MoDeGPT's attention modules (Lin et al., 2024): the Q·K pair by CR decomposition, the V·O pair by SVD.

**Q·K (type II).** Head ``h``'s scores ``q_h k_gᵀ = Σ_i q_{h,i} k_{g,i}`` are a sum of ``d``
rank-one terms, one per head dimension ``i``. CR decomposition keeps the ``d_qk`` terms of
largest bound ``‖q_{:,i}‖ ‖k_{:,i}‖`` on the calibration tokens, i.e. the score

.. math::  s_i = \\Big(\\sum_{h \\in g} \\sum_t q_{h,i}(t)^2\\Big)^{1/2} \\Big(\\sum_t k_{g,i}(t)^2\\Big)^{1/2}

(``‖C^{1/2} W_{q,i}‖·‖C^{1/2} W_{k,i}‖`` of the paper, with the biases in; the query heads
sharing key/value head ``g`` under grouped-query attention share its selection, so their
squares are added), and keeps those rows of ``W_q`` and ``W_k`` unchanged. With rotary
embeddings the dimensions ``i`` and ``i + d/2`` are rotated together by one angle, so they
are scored and kept as a pair, ``s_i = ‖(q_i, q_{i+d/2})‖·‖(k_i, k_{i+d/2})‖`` (a rotation
leaves the pair's norm unchanged, so the score is taken before the rotation), and
``d_qk`` is even.

**V·O (type III).** Key/value head ``g`` feeds ``O_g Z_g x`` to the output, with ``Z_g = W_{v,g}``
(``d × n``) and ``O_g`` the output blocks ``W_{o,h}`` of its query heads stacked (``r·n × d``).
The rank-``d_vo`` product closest on the calibration inputs (``C = Σ x xᵀ``) is the projection
of ``O_g Z_g`` on its top left singular vectors in the ``C`` metric; with ``O_g = Q R``:

.. math::  R Z_g C Z_g^T R^T = U \\Lambda U^T, \\qquad O_g' = Q U_k, \\qquad Z_g' = U_k^T R Z_g

so ``‖O_g Z_g X − O_g' Z_g' X‖²_F = Σ_{i>k} λ_i`` (the attention weights, which mix tokens,
are left out of the objective as in the paper). A value bias is first folded into the
output bias (``b_o += W_o b_v``), which is exact because each token's attention weights sum
to one. At full width both pairs reproduce the layer.

>>> import torch, spectrakit as sk, transformers
>>> model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_hidden_layers=1, hidden_size=32,
...     intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, vocab_size=100))
>>> report = sk.compress(model, method="modegpt", ratio=0.5, calibration=[torch.randint(0, 100, (2, 16))])
>>> model.model.layers[0].self_attn.qk_dim, model.model.layers[0].self_attn.vo_dim
(8, 8)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import linalg
from .._targets import layer_weight
from ..errors import SpectrakitError
from .narrow_attention import NarrowAttention

ATTENTION_SUPPORTED = ("Llama-style self-attention (q_proj, k_proj, v_proj, o_proj with rotary embeddings: Llama, "
                       "Mistral, Qwen2) and GPT-2 self-attention (c_attn, c_proj)")


@dataclass
class DenseAttention:
    """One dense attention layer, in the ``out × in`` weights MoDeGPT works on.

    Attributes:
        layout: ``"llama"`` or ``"gpt2"``.
        module: the layer.
        heads, kv_heads, head_dim: its head counts and width.
        q, k, v, o: the projections' weights (``out × in``; ``o`` is ``hidden × heads·head_dim``).
        q_bias, k_bias, v_bias, o_bias: their biases, or ``None``.
        reads: the layer whose input is the attention input (its Gram is ``C``).
        query_key: ``(layer, slice of its output that is q, slice that is k)`` for the scores.
    """

    layout: str
    module: nn.Module
    heads: int
    kv_heads: int
    head_dim: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    o_bias: torch.Tensor | None
    reads: nn.Module
    outputs: dict[str, tuple[nn.Module, slice]]

    @property
    def rotary(self) -> bool:
        """Whether the layer rotates its queries and keys (the Llama layout)."""
        return self.layout == "llama"


def out_in(layer: nn.Module) -> torch.Tensor:
    """The ``out × in`` weight of an ``nn.Linear`` or a transformers ``Conv1D`` (detached).

    Args:
        layer: the layer.
    """
    weight = layer_weight(layer).detach()
    return weight if isinstance(layer, nn.Linear) else weight.T  # transformers' Conv1D stores in × out


def _bias(layer: nn.Module) -> torch.Tensor | None:
    bias = getattr(layer, "bias", None)
    return bias.detach() if isinstance(bias, torch.Tensor) else None


def describe(module: nn.Module) -> DenseAttention | None:
    """The :class:`DenseAttention` of ``module`` when it is a self-attention layer of a known
    layout, else ``None``.

    Args:
        module: any submodule of the model.
    """
    children = ("q_proj", "k_proj", "v_proj", "o_proj")
    attributes: Any = module  # the head counts are plain attributes of the transformers layer
    if all(isinstance(getattr(module, c, None), nn.Linear) for c in children) and hasattr(module, "head_dim"):
        config = getattr(module, "config", None)
        if getattr(module, "q_norm", None) is not None or getattr(config, "partial_rotary_factor", 1.0) != 1.0:
            return None  # per-head norms or partial rotary: another layout
        q_proj, k_proj, v_proj, o_proj = (module.get_submodule(c) for c in children)
        head_dim = int(attributes.head_dim)
        q, k = out_in(q_proj), out_in(k_proj)
        heads, kv_heads = q.shape[0] // head_dim, k.shape[0] // head_dim
        if head_dim % 2 or not kv_heads or heads % kv_heads or heads * head_dim != q.shape[0]:
            return None
        return DenseAttention("llama", module, heads, kv_heads, head_dim, q, k, out_in(v_proj), out_in(o_proj),
                              _bias(q_proj), _bias(k_proj), _bias(v_proj), _bias(o_proj), v_proj,
                              {"q": (q_proj, slice(None)), "k": (k_proj, slice(None))})
    if (all(isinstance(getattr(module, c, None), nn.Module) for c in ("c_attn", "c_proj"))
            and not getattr(module, "is_cross_attention", False) and hasattr(module, "num_heads")):
        c_attn, c_proj = module.get_submodule("c_attn"), module.get_submodule("c_proj")
        weight, bias = out_in(c_attn), _bias(c_attn)
        hidden = weight.shape[1]
        heads = int(attributes.num_heads)
        if weight.shape[0] != 3 * hidden or hidden % heads:
            return None
        q, k, v = (weight[i * hidden:(i + 1) * hidden] for i in range(3))
        q_bias, k_bias, v_bias = (None if bias is None else bias[i * hidden:(i + 1) * hidden] for i in range(3))
        return DenseAttention("gpt2", module, heads, heads, hidden // heads, q, k, v, out_in(c_proj),
                              q_bias, k_bias, v_bias, _bias(c_proj), c_attn,
                              {"q": (c_attn, slice(0, hidden)), "k": (c_attn, slice(hidden, 2 * hidden))})
    return None


def find_attention(model: nn.Module) -> dict[str, DenseAttention]:
    """Every self-attention layer of a known layout in ``model``, by module name.

    Args:
        model: the model.
    """
    found = {}
    for name, module in model.named_modules():
        dense = describe(module)
        if dense is not None:
            found[name] = dense
    return found


class OutputSquares:
    """``Σ_t y_i(t)²`` per output feature of the hooked layers over the calibration pass (float64).

    Args:
        layers: ``{key: (layer, slice of its output features)}``.
    """

    def __init__(self, layers: dict[str, tuple[nn.Module, slice]]) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.handles = [layer.register_forward_hook(self._hook(key, part)) for key, (layer, part) in layers.items()]

    def _hook(self, key: str, part: slice) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            values = output.detach()[..., part]
            squares = values.reshape(-1, values.shape[-1]).double().square().sum(dim=0)
            self.sums[key] = squares if key not in self.sums else self.sums[key].add_(squares)
        return hook

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self.handles:
            handle.remove()


def query_key_selection(dense: DenseAttention, query_squares: torch.Tensor, key_squares: torch.Tensor,
                        keep: int) -> torch.Tensor:
    """The kept head dimensions of each key/value head, ``[kv_heads, keep]`` (rotary pairs as
    ``[S, S + d/2]``, ``S`` sorted; otherwise sorted), by the CR score (the module docstring).

    Args:
        dense: the layer.
        query_squares: ``Σ_t q²`` per query feature (``heads·head_dim``).
        key_squares: ``Σ_t k²`` per key feature (``kv_heads·head_dim``).
        keep: ``d_qk`` (even for rotary layers).
    """
    d, groups = dense.head_dim, dense.heads // dense.kv_heads
    q = query_squares.reshape(dense.kv_heads, groups, d).sum(dim=1)  # the group's query heads added
    k = key_squares.reshape(dense.kv_heads, d)
    if dense.rotary:
        q, k = q[:, : d // 2] + q[:, d // 2:], k[:, : d // 2] + k[:, d // 2:]
    scores = q.sqrt() * k.sqrt()
    units = keep // 2 if dense.rotary else keep
    chosen = torch.sort(torch.topk(scores, units, dim=1).indices, dim=1).values
    return torch.cat([chosen, chosen + d // 2], dim=1) if dense.rotary else chosen


def value_output_factors(dense: DenseAttention, gram: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                         torch.Tensor]:
    """``(W_v', W_o', λ)``: the new value rows (``kv_heads·keep × hidden``), output columns
    (``hidden × heads·keep``) and each head's eigenvalues ``λ`` (``[kv_heads, head_dim]``,
    descending), in float64 (the module docstring).

    Args:
        dense: the layer.
        gram: ``C = Σ x xᵀ`` of the attention input.
        keep: ``d_vo``.
    """
    d, groups, hidden = dense.head_dim, dense.heads // dense.kv_heads, dense.o.shape[0]
    C = gram.double()
    values: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    spectra: list[torch.Tensor] = []
    for g in range(dense.kv_heads):
        Z = dense.v[g * d:(g + 1) * d].double()  # d × hidden
        heads = range(g * groups, (g + 1) * groups)
        stacked = torch.cat([dense.o[:, h * d:(h + 1) * d].double() for h in heads], dim=0)  # O_g: r·hidden × d
        Q, R = torch.linalg.qr(stacked)
        RZ = R @ Z
        S, U = linalg.gram_spectrum(RZ @ C.to(RZ.device) @ RZ.mT)  # √λ and U of R Z C Zᵀ Rᵀ
        spectra.append(S.square())
        values.append(U[:, :keep].mT @ RZ)
        kept = Q @ U[:, :keep]  # r·hidden × keep: the new output columns of the group's heads
        outputs.extend(kept[i * hidden:(i + 1) * hidden] for i in range(groups))
    return torch.cat(values), torch.cat(outputs, dim=1), torch.stack(spectra)


def narrow(dense: DenseAttention, qk_index: torch.Tensor | None, vo: tuple[torch.Tensor, torch.Tensor] | None,
           model_config: Any) -> NarrowAttention:
    """The :class:`NarrowAttention` replacing ``dense``.

    Args:
        dense: the layer.
        qk_index: the kept query/key dimensions per key/value head (``None``: all).
        vo: ``(W_v', W_o')`` from :func:`value_output_factors` (``None``: the dense ones).
        model_config: the model's config (for its attention kernel).
    """
    d, groups = dense.head_dim, dense.heads // dense.kv_heads
    device, dtype = dense.q.device, dense.q.dtype
    if qk_index is None:
        qk_index = torch.arange(d, device=device).repeat(dense.kv_heads, 1)
    qk_index = qk_index.to(device)
    query_rows = torch.cat([h * d + qk_index[h // groups] for h in range(dense.heads)])
    key_rows = torch.cat([g * d + qk_index[g] for g in range(dense.kv_heads)])
    o_bias = dense.o_bias.double() if dense.o_bias is not None else None
    if dense.v_bias is not None:  # softmax rows sum to one, so the value bias passes straight to the output
        folded = dense.o.double() @ dense.v_bias.double().repeat_interleave(groups)
        o_bias = folded if o_bias is None else o_bias + folded
    if vo is None:
        values, outputs = dense.v, dense.o
    else:
        values, outputs = vo
    module = dense.module
    scaling = float(getattr(module, "scaling", d ** -0.5))
    if dense.layout == "gpt2":
        attention_dropout = float(getattr(getattr(module, "attn_dropout", None), "p", 0.0))
        output_dropout = float(getattr(getattr(module, "resid_dropout", None), "p", 0.0))
    else:
        attention_dropout, output_dropout = float(getattr(module, "attention_dropout", 0.0)), 0.0
    layer = NarrowAttention(dense.o.shape[0], dense.heads, dense.kv_heads, int(qk_index.shape[1]),
                            values.shape[0] // dense.kv_heads, scaling, q_bias=dense.q_bias is not None,
                            k_bias=dense.k_bias is not None, o_bias=o_bias is not None, head_dim=d,
                            rotary=dense.rotary, layer_idx=getattr(module, "layer_idx", None),
                            attention_dropout=attention_dropout, output_dropout=output_dropout,
                            config=model_config, device=device, dtype=dtype)
    with torch.no_grad():
        layer.q_proj.weight.copy_(dense.q[query_rows])
        layer.k_proj.weight.copy_(dense.k[key_rows])
        layer.v_proj.weight.copy_(values)
        layer.o_proj.weight.copy_(outputs)
        if dense.q_bias is not None and layer.q_proj.bias is not None:
            layer.q_proj.bias.copy_(dense.q_bias[query_rows])
        if dense.k_bias is not None and layer.k_proj.bias is not None:
            layer.k_proj.bias.copy_(dense.k_bias[key_rows])
        if o_bias is not None and layer.o_proj.bias is not None:
            layer.o_proj.bias.copy_(o_bias)
        layer.rotary_index.copy_(qk_index)
    if not all(torch.isfinite(p).all() for p in layer.parameters()):
        raise SpectrakitError("modegpt: the compressed attention has non-finite weights")
    return layer.train(module.training)
