"""Structured replacements: Monarch and Block Tensor-Train (BTT) layers, fitted by projection.

A BTT layer with ``b`` blocks and rank ``r`` (Qiu et al., 2024) splits the input into ``b``
blocks of ``p = in/b`` and the output into ``b`` blocks of ``s = out/b``; block ``(c, a)`` of
its ``out × in`` matrix (output block ``c``, input block ``a``) has rank ``r``:

.. math::  W_{c,a} = L_{c,:,a,:} \\, R_{a,c,:,:}, \\qquad L \\in \\mathbb{R}^{b\\times s\\times b\\times r},
           \\; R \\in \\mathbb{R}^{b\\times b\\times r\\times p}

so it holds ``r·b·(in + out)`` weights — what a rank-``r·b`` low-rank layer holds — and
is applied as two batched products, ``z_{a,c} = R_{a,c} x_a`` then ``y_c = Σ_a L_{c,:,a} z_{a,c}``.
A Monarch layer (Dao et al., 2022) is the rank-1 case (``W = P L Pᵀ R`` with block-diagonal
``L``, ``R`` and a permutation ``P``, written out block by block). Since the blocks are
independent, the nearest such matrix to ``W`` in Frobenius norm is the rank-``r`` truncated
SVD of every block: that is the projection used here (exact for a matrix of that
structure). Both need ``b`` to divide ``in`` and ``out``.

Through :func:`spectrakit.compress` (``method="monarch"`` or ``"btt"``) every targeted layer
gets the parameters of the uniform low-rank allocation at the same ``ratio=``/``rank=``:
Monarch takes the largest ``b`` dividing both sizes with ``b·(in + out)`` within it; BTT takes
``b = blocks=`` (default: the largest divisor of ``gcd(in, out)`` up to ``√min(in, out)``)
and the largest ``r`` that fits. No calibration is needed.

>>> import torch
>>> W = torch.randn(8, 12, dtype=torch.float64)
>>> layer = BlockTensorTrainLinear.from_weight(W, blocks=2, rank=2)
>>> sum(p.numel() for p in layer.parameters()) == 2 * 2 * (8 + 12)  # r·b·(in + out), no bias
True
>>> torch.allclose(BlockTensorTrainLinear.from_weight(layer.weight, blocks=2, rank=2).weight, layer.weight)
True
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import SpectrakitError
from ..linalg import svd

STRUCTURES = ("monarch", "btt")


def _check_blocks(kind: str, in_features: int, out_features: int, blocks: int, rank: int) -> None:
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise SpectrakitError(f"{kind}: blocks={blocks!r} must be an integer >= 1")
    for label, size in (("in_features", in_features), ("out_features", out_features)):
        if size % blocks:
            raise SpectrakitError(f"{kind}: {label}={size} does not split into {blocks} equal blocks "
                                  f"(blocks must divide both {in_features} and {out_features})")
    limit = min(in_features, out_features) // blocks
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise SpectrakitError(f"{kind}: rank={rank!r} must be an integer in [1, {limit}] "
                              f"(the blocks are {out_features // blocks} × {in_features // blocks})")


class BlockTensorTrainLinear(nn.Module):
    """A linear layer of block rank ``rank`` over ``blocks × blocks`` blocks (module docstring).

    Args:
        in_features, out_features: the sizes; ``blocks`` must divide both.
        blocks: the number of input (and output) blocks.
        rank: the rank of each block, at most ``min(in, out) / blocks``.
        bias: whether the layer adds a bias.
        device, dtype: where and how the cores are allocated.
    """

    kind = "btt"

    def __init__(self, in_features: int, out_features: int, blocks: int, rank: int = 1, bias: bool = True, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        _check_blocks(type(self).__name__, in_features, out_features, blocks, rank)
        self.in_features, self.out_features, self.blocks, self.rank = in_features, out_features, blocks, rank
        inner, outer = in_features // blocks, out_features // blocks
        self.right = nn.Parameter(torch.empty(blocks, blocks, rank, inner, device=device, dtype=dtype))  # R[a,c,t,j]
        self.left = nn.Parameter(torch.empty(blocks, outer, blocks, rank, device=device, dtype=dtype))  # L[c,d,a,t]
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        with torch.no_grad():
            nn.init.normal_(self.right, std=inner ** -0.5)
            nn.init.normal_(self.left, std=(blocks * rank) ** -0.5)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, blocks: int, rank: int = 1, bias: torch.Tensor | None = None, *,
                    dtype: torch.dtype | None = None) -> BlockTensorTrainLinear:
        """The layer of this structure nearest to ``weight`` (``out × in``) in Frobenius norm:
        each block's rank-``rank`` truncated SVD, in float64.

        Args:
            weight: the dense ``out × in`` matrix.
            blocks, rank: the structure.
            bias: the bias to keep, if any.
            dtype: the layer's dtype (default ``weight``'s).
        """
        out_features, in_features = weight.shape
        layer = nn.utils.skip_init(cls, in_features, out_features, blocks, rank, bias=bias is not None,
                                   device=weight.device, dtype=dtype or weight.dtype)
        outer, inner = out_features // blocks, in_features // blocks
        grid = weight.detach().double().reshape(blocks, outer, blocks, inner).permute(0, 2, 1, 3)  # [c, a, s, p]
        U, S, Vh = svd(grid, method="exact")  # every block's thin SVD in one batched call
        root = S[..., :rank].sqrt()
        left = U[..., :rank] * root[..., None, :]  # [c, a, s, t]
        right = root[..., :, None] * Vh[..., :rank, :]  # [c, a, t, p]
        with torch.no_grad():
            layer.left.copy_(left.permute(0, 2, 1, 3))  # [c, s, a, t]
            layer.right.copy_(right.permute(1, 0, 2, 3))  # [a, c, t, p]
            if bias is not None:
                assert layer.bias is not None
                layer.bias.copy_(bias)
        return layer

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``out × in`` matrix (computed, for inspection only)."""
        dense = torch.einsum("cdat,actj->cdaj", self.left, self.right)
        return dense.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = x.reshape(-1, self.blocks, self.in_features // self.blocks)  # [n, a, p]
        inner = torch.einsum("nap,actp->nact", blocks, self.right)  # each input block into each output block
        out = torch.einsum("nact,cdat->ncd", inner, self.left).reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, blocks={self.blocks}, "
                f"rank={self.rank}, bias={self.bias is not None}")


class MonarchLinear(BlockTensorTrainLinear):
    """A Monarch layer: :class:`BlockTensorTrainLinear` with rank 1 per block.

    Args:
        in_features, out_features: the sizes; ``blocks`` must divide both.
        blocks: the number of blocks (``√n`` in the paper's square case).
        bias, device, dtype: as for :class:`BlockTensorTrainLinear`.
    """

    kind = "monarch"

    def __init__(self, in_features: int, out_features: int, blocks: int, rank: int = 1, bias: bool = True, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        if rank != 1:
            raise SpectrakitError(f"MonarchLinear: rank={rank!r}; a Monarch layer has rank 1 per block "
                                  "(use BlockTensorTrainLinear)")
        super().__init__(in_features, out_features, blocks, 1, bias, device=device, dtype=dtype)


def structured_parameters(in_features: int, out_features: int, blocks: int, rank: int) -> int:
    """Weights of a BTT (or Monarch, ``rank=1``) layer, bias not counted: ``r·b·(in + out)``."""
    return rank * blocks * (in_features + out_features)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def choose_structure(kind: str, in_features: int, out_features: int, budget: int,
                     blocks: int | None = None) -> tuple[int, int] | None:
    """``(blocks, rank)`` of the largest ``kind`` layer within ``budget`` weights, or None if
    even the smallest does not fit (see the module docstring).

    Args:
        kind: ``"monarch"`` or ``"btt"``.
        in_features, out_features: the layer's sizes.
        budget: the weights it may hold.
        blocks: a fixed number of blocks (must divide both sizes); default chosen as documented.
    """
    common = math.gcd(in_features, out_features)
    span = in_features + out_features
    if blocks is not None:
        _check_blocks(kind, in_features, out_features, blocks, 1)
    if kind == "monarch":
        options = [blocks] if blocks is not None else _divisors(common)
        fitting = [b for b in options if b * span <= budget]
        return (max(fitting), 1) if fitting else None
    if blocks is None:
        blocks = max(d for d in _divisors(common) if d * d <= min(in_features, out_features))
    rank = min(budget // (blocks * span), min(in_features, out_features) // blocks)
    return (blocks, rank) if rank >= 1 else None


def build(kind: str, weight: torch.Tensor, blocks: int, rank: int, bias: torch.Tensor | None,
          dtype: torch.dtype) -> BlockTensorTrainLinear:
    """A ``kind`` layer fitted to ``weight`` by projection (:meth:`BlockTensorTrainLinear.from_weight`).

    Args:
        kind: ``"monarch"`` or ``"btt"``.
        weight: the dense ``out × in`` matrix.
        blocks, rank: the structure.
        bias: the bias to keep.
        dtype: the new layer's dtype.
    """
    cls = MonarchLinear if kind == "monarch" else BlockTensorTrainLinear
    return cls.from_weight(weight, blocks, rank, bias, dtype=dtype)
