"""CLOVER: orthonormalize each attention head's Q·Kᵀ and V·O pairs, then tune their singular
values (Meng et al., 2024; seed 001).

A head's scores depend on ``W_qᵀ W_k`` and its output on ``W_o W_v`` only, so any invertible
``T`` per head (per key/value head under GQA, shared by its query heads) may move between
the two factors. With ``W_qᵀ`` stacked over a group's query heads, ``L = Q_L R_L`` and
``W_kᵀ = Q_K R_K`` (QR), and the SVD ``R_L R_Kᵀ = u diag(s) vᵀ`` of the small core:

    T = vᵀ R_K^{-T}:   T W_k = vᵀ Q_Kᵀ          (orthonormal rows),
    W_q ← T^{-T} W_q:  [W_qᵀ T^{-1}] = Q_L u diag(s)   (orthonormal columns times the singular values),

so ``(T^{-T} W_q)ᵀ (T W_k) = W_qᵀ W_k`` per head and ``s`` are the singular values of the
group's stacked Q·Kᵀ form. V·O is the same with ``L = W_o`` (the head's input columns of
the output projection) and ``W_v`` in place of ``W_k``. Biases follow their rows
(``b_k ← T b_k``, ``b_q ← T^{-T} b_q``; ``b_v ← T b_v`` passes the softmax average unchanged).
Trainable: ``λ`` per orthonormal direction on the key/value side, ``λ = 1`` at
initialization, i.e. the singular values ``s ⊙ λ``:

    k = λ ⊙ (T (W_k x + b_k)),   q = T^{-T}(W_q x + b_q),
    v = λ ⊙ (T (W_v x + b_v)),   o = W_o (blockdiag(T^{-1}) z) + b_o.

The transforms never train: each forward folds them into the projection's weight
(``d_head·out·in`` work, no weight gradient) and ``λ`` scales the output channels; they are
saved with the adapter. Exact at initialization
up to rounding (``T^{-1} T = I``). Merges exactly: the transforms and ``λ`` are written into
the weights and biases (the merged model is a re-parametrization of the base, then tuned).

Supported attention: Llama-style (``q_proj, k_proj, v_proj, o_proj``, GQA included), GPT-2
(the fused ``c_attn`` and ``c_proj``) and BERT (``query, key, value`` and ``output.dense``).
Rotary embeddings sit between Q·K: no transform that orthonormalizes a head commutes with
them, so on Llama-style attention ``pairs="auto"`` tunes V·O only and ``pairs`` naming
``"qk"`` is refused. Trainable parameters: ``d_head`` per key/value head and pair.

>>> model = sk.adapt(gpt2_model, "clover")          # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import linalg
from ..errors import SpectrakitError
from .base import AdaptedLinear, is_conv1d, register

PAIRS = ("qk", "vo")


@dataclass
class Attention:
    """Where one attention block's projections are, and its head layout."""

    q: str
    k: str
    v: str
    o: str
    heads: int
    kv_heads: int
    head_dim: int
    rotary: bool
    fused: bool = False  # GPT-2: q, k, v are the three thirds of one layer


def attention_blocks(model: nn.Module) -> list[Attention]:
    """Every Llama-style, GPT-2 and BERT self-attention block of ``model``."""
    found = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if all(hasattr(module, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) and hasattr(module, "head_dim"):
            d_h = int(module.head_dim)
            found.append(Attention(prefix + "q_proj", prefix + "k_proj", prefix + "v_proj", prefix + "o_proj",
                                   _out(module.q_proj) // d_h, _out(module.k_proj) // d_h, d_h, rotary=True))
        elif hasattr(module, "c_attn") and hasattr(module, "c_proj") and hasattr(module, "num_heads"):
            if getattr(module, "is_cross_attention", False):
                continue
            d_h = int(module.head_dim)
            found.append(Attention(prefix + "c_attn", prefix + "c_attn", prefix + "c_attn", prefix + "c_proj",
                                   int(module.num_heads), int(module.num_heads), d_h, rotary=False, fused=True))
        elif (hasattr(module, "self") and hasattr(module, "output")
              and all(hasattr(module.self, p) for p in ("query", "key", "value"))
              and hasattr(module.output, "dense")):
            heads, d_h = int(module.self.num_attention_heads), int(module.self.attention_head_size)
            found.append(Attention(prefix + "self.query", prefix + "self.key", prefix + "self.value",
                                   prefix + "output.dense", heads, heads, d_h, rotary=False))
    return found


def _out(layer: nn.Module) -> int:
    weight: Any = layer.weight
    return int(weight.shape[1] if is_conv1d(layer) else weight.shape[0])


def _rows(layer: nn.Module) -> torch.Tensor:
    """``out × in`` weight in float64."""
    weight: Any = layer.weight
    return (weight.T if is_conv1d(layer) else weight).detach().to(torch.float64)


def pair_transform(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(T, T⁻¹, s)`` for the bilinear form ``left @ right`` (``left``: stacked ``n·d × d_h``,
    ``right``: ``d_h × d``), with ``T right`` orthonormal-rowed and ``left T⁻¹ = U diag(s)``.

    Args:
        left: the stacked query (``W_qᵀ``) or output (``W_o`` columns) factors of one group.
        right: the shared key or value rows ``W_k`` / ``W_v`` of the group.
    """
    Q_r, R_r = torch.linalg.qr(right.T)
    _, R_l = torch.linalg.qr(left)
    _, s, vh = linalg.svd(R_l @ R_r.T, method="exact")
    if float(s.min()) <= 1e-12 * float(s.max()):
        raise SpectrakitError("clover: a head's Q·K or V·O factor is rank-deficient; it has no orthonormal basis")
    inverse = R_r.T @ vh.T  # T⁻¹ = R_rᵀ v
    transform = torch.linalg.solve(inverse, torch.eye(inverse.shape[0], dtype=inverse.dtype))
    return transform, inverse, s


@register
class CLOVERLinear(AdaptedLinear):
    """One projection of a CLOVER pair: transforms on ``d_head``-wide slices of its output
    (``side="output"``: Q, K, V) or input (``side="input"``: O), ``λ`` on some of them."""

    method = "clover"
    options = ("pairs",)
    transforms: nn.Parameter
    scales: nn.Parameter
    channels: torch.Tensor

    def __init__(self, base_layer: nn.Module, rank: int, *, name: str = "", side: str = "output",
                 head_dim: int = 1, blocks: list[int] | None = None, tuned: list[int] | None = None,
                 init: dict[str, Any] | None = None) -> None:
        super().__init__(base_layer, rank, name=name)
        self.side, self.head_dim = side, int(head_dim)
        self.blocks, self.tuned = [int(b) for b in blocks or []], [int(b) for b in tuned or []]
        eye = torch.eye(self.head_dim).expand(len(self.blocks), -1, -1)
        transforms = (init or {}).get("transforms", eye)
        # saved with the adapter (they come from the other layer of the pair), never trained
        self.transforms = nn.Parameter(self.new_parameter(transforms).detach(), requires_grad=False)
        self.scales = self.new_parameter(torch.ones(len(self.tuned), self.head_dim))
        index = torch.cat([torch.arange(b, b + self.head_dim) for b in self.blocks]) if self.blocks else \
            torch.zeros(0, dtype=torch.long)
        self.register_buffer("channels", index.to(self.base_layer.weight.device), persistent=False)
        self.tuned_slots = [self.blocks.index(b) for b in self.tuned]

    @classmethod
    def check_layer(cls, name: str, out_features: int, in_features: int, kwargs: dict[str, Any]) -> None:
        return None  # the plan builds every layer's slices from the model's own head layout

    @classmethod
    def plan(cls, model: nn.Module, layers: dict[str, nn.Module], rank: int,
             options: dict[str, Any]) -> dict[str, dict[str, Any]]:
        blocks = [b for b in attention_blocks(model) if all(n in layers for n in (b.q, b.k, b.v, b.o))]
        if not blocks:
            raise SpectrakitError("clover: no Llama, GPT-2 or BERT self-attention among the target layers")
        plan: dict[str, dict[str, Any]] = {}
        for block in blocks:
            pairs = _pairs(options.get("pairs", "auto"), block)
            for pair in pairs:
                _plan_pair(plan, layers, block, pair)
        return plan

    def config(self) -> dict[str, Any]:
        return {"rank": self.rank, "side": self.side, "head_dim": self.head_dim, "blocks": self.blocks,
                "tuned": self.tuned}

    def _slice_maps(self) -> torch.Tensor:
        """Each block's map ``M_b`` (``λ`` folded into the tuned ones), ``n_blocks × d_h × d_h``."""
        maps: torch.Tensor = self.transforms
        if self.tuned:
            factor = torch.ones(len(self.blocks), self.head_dim, dtype=maps.dtype, device=maps.device)
            factor = factor.index_copy(0, torch.tensor(self.tuned_slots, device=maps.device), self.scales)
            maps = factor[:, :, None] * maps
        return maps

    def _mix(self, h: torch.Tensor, maps: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``h`` with each block's channels ``c`` replaced by ``M_b c`` (``M_bᵀ c`` if ``transpose``)."""
        if not self.blocks:
            return h
        picked = h.index_select(-1, self.channels).unflatten(-1, (len(self.blocks), self.head_dim))
        mixed = torch.einsum("...bi,bji->...bj" if not transpose else "...bi,bij->...bj", picked, maps)
        return h.index_copy(-1, self.channels, mixed.flatten(-2))

    def _folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``W`` and ``b`` with the frozen transforms applied (``λ`` left out), without a graph."""
        with torch.no_grad():
            W = self.base_weight().to(self.adapter_dtype)
            bias = self.base_layer.bias
            bias = None if bias is None else bias.to(self.adapter_dtype)
            if self.side == "input":
                return self._mix(W, self.transforms, transpose=True), bias
            return self._mix(W.T, self.transforms).T, None if bias is None else self._mix(bias, self.transforms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.side == "input" and self.tuned:  # λ between the transform and W: mix the input itself
            return self.base_layer(self._mix(self.adapter_input(x), self._slice_maps()).to(x.dtype))
        # the transforms never train, so they are folded into the weight (d_head·out·in work, no
        # weight gradient) and only λ acts on the output: M_b y_b = λ_b ⊙ (T_b y_b)
        weight, bias = self._folded()
        out = nn.functional.linear(self.adapter_input(x), weight, bias)
        if self.tuned:
            factor = torch.ones(self.out_features, dtype=out.dtype, device=out.device)
            tuned_channels = self.channels.unflatten(0, (len(self.blocks), self.head_dim))[self.tuned_slots]
            out = out * factor.index_copy(0, tuned_channels.flatten(), self.scales.flatten())
        return out.to(x.dtype)

    def merged_weight(self) -> torch.Tensor:
        W = self.base_weight().to(self.adapter_dtype)
        if self.side == "input":  # columns of block b: W_b M_b, i.e. rows of W ↦ M_bᵀ-mixed
            return self._mix(W, self._slice_maps(), transpose=True)
        return self._mix(W.T, self._slice_maps()).T

    def delta_weight(self) -> torch.Tensor:
        return self.merged_weight() - self.base_weight().to(self.adapter_dtype)

    def merged_bias(self) -> torch.Tensor | None:
        bias = self.base_layer.bias
        if bias is None or self.side == "input":
            return bias
        return self._mix(bias.to(self.adapter_dtype), self._slice_maps()).to(bias.dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.merged_bias()

    def restore(self) -> nn.Module:
        with torch.no_grad():
            bias = self.merged_bias()
            if bias is not None and self.side == "output":
                self.base_layer.bias.copy_(bias)
        return super().restore()

    def trainable(self) -> dict[str, nn.Parameter]:
        return {"transforms": self.transforms, "scales": self.scales}


def _pairs(option: Any, block: Attention) -> tuple[str, ...]:
    if option == "auto":
        return ("vo",) if block.rotary else PAIRS
    chosen = tuple(p.strip() for p in str(option).split(","))
    unknown = [p for p in chosen if p not in PAIRS]
    if unknown or not chosen:
        raise SpectrakitError(f"pairs={option!r}: choose from 'qk', 'vo', 'qk,vo' or 'auto'")
    if "qk" in chosen and block.rotary:
        raise SpectrakitError(f"clover: {block.q} feeds rotary embeddings, which no Q·K orthonormalization "
                              "commutes with; use pairs='vo'")
    return chosen


def _plan_pair(plan: dict[str, dict[str, Any]], layers: dict[str, nn.Module], block: Attention,
               pair: str) -> None:
    """Add one pair's transforms to the per-layer plan (GPT-2's fused layer collects three parts)."""
    d_h, group = block.head_dim, block.heads // block.kv_heads
    width = block.heads * d_h
    left_name, right_name = (block.q, block.k) if pair == "qk" else (block.o, block.v)
    left, right = _rows(layers[left_name]), _rows(layers[right_name])
    offset = {"qk": (0, width), "vo": (0, 2 * width)}[pair] if block.fused else (0, 0)
    right_maps, left_maps, right_blocks, left_blocks = [], [], [], []
    for g in range(block.kv_heads):
        r0 = offset[1] + g * d_h
        W_right = right[r0:r0 + d_h]
        heads = range(g * group, (g + 1) * group)
        if pair == "qk":  # query rows of each head, as d × d_h columns, stacked
            stacked = torch.cat([left[offset[0] + h * d_h:offset[0] + (h + 1) * d_h].T for h in heads])
        else:  # the output projection's input columns of each head
            stacked = torch.cat([left[:, h * d_h:(h + 1) * d_h] for h in heads])
        T, T_inv, _ = pair_transform(stacked, W_right)
        right_maps.append(T)
        right_blocks.append(r0)
        for h in heads:
            left_maps.append(T_inv.T if pair == "qk" else T_inv)
            left_blocks.append(offset[0] + h * d_h)
    left_side = "output" if pair == "qk" else "input"
    _add(plan, right_name, "output", d_h, right_blocks, torch.stack(right_maps), tuned=True)
    _add(plan, left_name, left_side, d_h, left_blocks, torch.stack(left_maps), tuned=False)


def _add(plan: dict[str, dict[str, Any]], name: str, side: str, d_h: int, blocks: list[int], maps: torch.Tensor,
         tuned: bool) -> None:
    entry = plan.setdefault(name, {"rank": 1, "side": side, "head_dim": d_h, "blocks": [], "tuned": [],
                                   "init": {"transforms": torch.zeros(0, d_h, d_h, dtype=torch.float64)}})
    entry["blocks"] = entry["blocks"] + blocks
    if tuned:
        entry["tuned"] = entry["tuned"] + blocks
    entry["init"]["transforms"] = torch.cat([entry["init"]["transforms"], maps])
