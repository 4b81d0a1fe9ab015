"""Gradient–eigenspace alignment (Gur-Ari, Roberts & Dyer, *Gradient Descent Happens in a
Tiny Subspace*, 2018): the share of the gradient that lies in the top-``k`` Hessian
eigenspace,

    alignment = ‖Pₖ g‖² / ‖g‖² = ‖Vₖᵀ g‖² / ‖g‖²,

with ``Vₖ`` the orthonormal top-``k`` eigenvectors. 1 means the gradient lives in that
space; a random direction in ``n`` dimensions gives about ``k/n``.

>>> import torch
>>> V = torch.eye(4, dtype=torch.float64)[:, :2]
>>> gradient_alignment(torch.tensor([3.0, 0.0, 4.0, 0.0], dtype=torch.float64), V)
0.36
"""

from __future__ import annotations

import torch

from ...errors import SpectrakitError


def gradient_alignment(gradient: torch.Tensor, eigenvectors: torch.Tensor) -> float:
    """``‖Vᵀg‖² / ‖g‖²`` for orthonormal columns ``V`` (``n × k``) and a flat gradient ``g``.

    Args:
        gradient: the flat gradient (``n`` entries).
        eigenvectors: ``n × k`` orthonormal columns (e.g. ``Curvature.top(k, vectors=True)``).
    """
    g = gradient.reshape(-1).double()
    V = eigenvectors.double().to(g.device)
    if V.ndim != 2 or V.shape[0] != g.numel():
        raise SpectrakitError(f"eigenvectors of shape {tuple(V.shape)} do not match a gradient of {g.numel()} entries")
    norm2 = float(g.square().sum())
    if norm2 == 0:
        raise SpectrakitError("gradient is zero: its alignment is undefined")
    return float((V.T @ g).square().sum()) / norm2
