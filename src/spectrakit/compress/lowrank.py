"""``LowRankLinear``: a linear layer stored as two thin factors, in → k → out.

.. math::  y = U_k (D_k x) + b, \\qquad D_k \\in \\mathbb{R}^{k\\times n_{in}},\\;
           U_k \\in \\mathbb{R}^{n_{out}\\times k}

It holds ``k·(in + out)`` weights instead of ``in·out``, which is fewer exactly when
``k < in·out / (in + out)``; :func:`break_even_rank` is the largest such ``k``.

>>> import torch
>>> layer = LowRankLinear(in_features=64, out_features=32, rank=4)
>>> layer(torch.randn(5, 64)).shape
torch.Size([5, 32])
>>> sum(p.numel() for p in layer.parameters())  # 4·(64 + 32) + 32
416
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def break_even_rank(in_features: int, out_features: int) -> int:
    """The largest rank whose two factors hold strictly fewer weights than the dense matrix.

    Args:
        in_features: the dense layer's input size.
        out_features: its output size.
    """
    return (in_features * out_features - 1) // (in_features + out_features)


def low_rank_parameters(in_features: int, out_features: int, rank: int) -> int:
    """Weights of the two factors (the bias is not counted: it is kept as it was)."""
    return rank * (in_features + out_features)


class LowRankLinear(nn.Module):
    """A factorized ``nn.Linear``: ``down`` (k × in) then ``up`` (out × k), plus the bias.

    Attributes:
        down: ``Parameter`` of shape ``(rank, in_features)``.
        up: ``Parameter`` of shape ``(out_features, rank)``.
        bias: ``Parameter`` of shape ``(out_features,)`` or ``None``.
        method: the compression method that produced it (kept for saving).

    Args:
        in_features: input size.
        out_features: output size.
        rank: the inner size k.
        bias: whether the layer has a bias.
        method: the compression method's name, saved with the layer.
        device: where the parameters are created.
        dtype: the parameters' dtype.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *,
                 method: str = "", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if rank < 1 or in_features < 1 or out_features < 1:
            raise ValueError(f"rank, in_features, out_features must be >= 1, got {rank}, {in_features}, {out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.method = method
        self.down = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.up = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        # A fresh layer (e.g. one about to be filled from a checkpoint) gets a small,
        # well-scaled random init rather than uninitialized memory.
        with torch.no_grad():
            nn.init.normal_(self.down, std=in_features ** -0.5)
            nn.init.normal_(self.up, std=rank ** -0.5)

    @classmethod
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None = None, *,
                     method: str = "", dtype: torch.dtype | None = None) -> LowRankLinear:
        """A layer holding ``up`` (out × k), ``down`` (k × in) and ``bias``, cast to ``dtype``."""
        out_features, rank = up.shape
        dtype = dtype or up.dtype
        layer = nn.utils.skip_init(cls, down.shape[1], out_features, rank, bias=bias is not None, method=method,
                                   device=up.device, dtype=dtype)  # no random init: overwritten at once
        with torch.no_grad():
            layer.up.copy_(up)
            layer.down.copy_(down)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``out × in`` product ``up @ down`` (computed, for inspection only)."""
        return self.up @ self.down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.linear(x, self.down)          # in -> k
        return F.linear(hidden, self.up, self.bias)  # k -> out, bias as the dense layer had it

    def extra_repr(self) -> str:
        method = f", method={self.method!r}" if self.method else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}{method}")
