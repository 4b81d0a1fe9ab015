"""Low-rank projections of a gradient for :class:`~spectrakit.optimize.GaLore`.

Both act on the shorter side ``d = min(m, n)`` of ``G`` (``m × n``) and return an
orthonormal ``d × r`` basis ``P``; the gradient is then ``PᵀG`` (``m ≤ n``) or ``G P``.

- ``"svd"``: ``P`` = the top-``r`` singular vectors of ``G`` on that side
  (:func:`spectrakit.linalg.svd` with ``k=r``).
- ``"dct"``: ``P`` = ``r`` columns of the orthonormal DCT-II basis ``D`` (``d × d``,
  ``D_ij = √(2/d)·c_j·cos(π(2i + 1)j / 2d)``, ``c_0 = 1/√2``, else 1), those with the
  largest energy ``‖D_jᵀ G‖²`` (columns of ``G``'s side): one product and a sort, no
  SVD. Only the ``r`` indices need storing; ``D`` is the same for every matrix of a size.
"""

from __future__ import annotations

import math

import torch

from ..linalg import svd

_DCT_CACHE: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def dct_basis(d: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The orthonormal DCT-II basis of size ``d`` (columns are the cosines), cached.

    Args:
        d: size.
        dtype, device: of the result.

    >>> D = dct_basis(6, torch.float64)
    >>> torch.allclose(D.T @ D, torch.eye(6, dtype=torch.float64))
    True
    """
    key = (d, dtype, torch.device(device))
    if key not in _DCT_CACHE:
        i = torch.arange(d, dtype=torch.float64)[:, None]
        j = torch.arange(d, dtype=torch.float64)[None, :]
        basis = math.sqrt(2 / d) * torch.cos(math.pi * (2 * i + 1) * j / (2 * d))
        basis[:, 0] /= math.sqrt(2)
        _DCT_CACHE[key] = basis.to(dtype=dtype, device=device)
    return _DCT_CACHE[key]


def left_side(G: torch.Tensor) -> bool:
    """Whether ``G`` is projected from the left (``m ≤ n``: ``PᵀG``)."""
    return G.shape[0] <= G.shape[1]


def dct_indices(G: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank`` DCT columns that keep the most of ``G``'s energy (ascending index order)."""
    left = left_side(G)
    basis = dct_basis(G.shape[0] if left else G.shape[1], G.dtype, G.device)
    coefficients = basis.mT @ G if left else G @ basis  # d × n, or m × d
    energy = coefficients.square().sum(dim=1 if left else 0)
    return torch.topk(energy, rank).indices.sort().values


def svd_basis(G: torch.Tensor, rank: int) -> torch.Tensor:
    """The top-``rank`` singular vectors of ``G`` on its shorter side (``d × rank``)."""
    U, _, Vh = svd(G.float() if G.dtype in (torch.float16, torch.bfloat16) else G, k=rank)
    return (U if left_side(G) else Vh.mT).to(G.dtype)
