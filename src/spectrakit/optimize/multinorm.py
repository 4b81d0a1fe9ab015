r"""MultiNormalized: stateless steps along the gradient normalized under several norms at once.

Gradient multi-normalization (Scetbon et al., 2025) replaces the gradient by a point
that is normalized for several norms simultaneously, found by normalizing for each in
turn. Its scalable instance, SinkGD, alternates the row and the column normalization of
the ``m × n`` gradient, ``L`` times (SR-Sinkhorn):

    X₀ = G_t
    X_ℓ′ = √n · Q(X_{ℓ−1})⁻¹ X_{ℓ−1}        (every row to ℓ₂ norm √n)
    X_ℓ  = √m · X_ℓ′ R(X_ℓ′)⁻¹              (every column to ℓ₂ norm √m)
    W_t = (1 − ηλ)·W_{t−1} − η·X_L

with ``Q(X)``, ``R(X)`` the diagonals of row and column norms. The alternation converges
to a matrix whose rows all have norm ``√n`` and whose columns all have norm ``√m``
(entries of RMS 1, like Adam's update); it keeps no state, so the optimizer's memory is
that of SGD. ``eps`` floors the norms so a zero row or column stays zero.

>>> import torch, spectrakit as sk
>>> layer = torch.nn.Linear(16, 8, bias=False)
>>> opt = sk.optimize.MultiNormalized(layer.parameters(), lr=1e-3)
>>> layer(torch.randn(4, 16)).square().sum().backward()
>>> opt.step()
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from ._base import MatrixOptimizer, as_matrix_view, check_count


def sinkhorn_normalize(G: torch.Tensor, iterations: int = 5, eps: float = 1e-30) -> torch.Tensor:
    """``X_L`` of the alternating row/column normalization above.

    Args:
        G: ``m × n`` matrix.
        iterations: ``L``.
        eps: floor of the row and column norms.
    """
    m, n = G.shape
    X = G
    for _ in range(iterations):
        X = X * (math.sqrt(n) / torch.linalg.vector_norm(X, dim=1, keepdim=True).clamp_min(eps))
        X = X * (math.sqrt(m) / torch.linalg.vector_norm(X, dim=0, keepdim=True).clamp_min(eps))
    return X


class MultiNormalized(MatrixOptimizer):
    """SinkGD: steps along the row- and column-normalized gradient (see the module docstring).

    Args:
        params: matrices (conv kernels allowed), named parameters or param groups.
        lr: learning rate ``η``.
        iterations: ``L``, the row/column alternations.
        weight_decay: decoupled weight decay ``λ``.
        eps: floor of the norms.
        distributed, process_group, check_finite: see :class:`._base.MatrixOptimizer`.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, iterations: int = 5, weight_decay: float = 0.0,
                 eps: float = 1e-30, *, distributed: bool = True, process_group: object | None = None,
                 check_finite: bool = True) -> None:
        defaults = {"lr": lr, "iterations": iterations, "weight_decay": weight_decay, "eps": eps}
        super().__init__(params, defaults, distributed=distributed, process_group=process_group,
                         check_finite=check_finite)

    def check_group(self, group: dict[str, Any]) -> None:
        """Refuse bad options in ``group`` with one line.

        Args:
            group: a param group.
        """
        if not group.get("adamw"):
            check_count("iterations", group["iterations"], "MultiNormalized")

    def matrix_step(self, groups: list[dict[str, Any]]) -> None:
        """The normalized step for each matrix of ``groups``.

        Args:
            groups: the matrix param groups.
        """
        for group in groups:
            for _, param, grad in self.named_grads(group):
                direction = sinkhorn_normalize(as_matrix_view(grad), group["iterations"], group["eps"])
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(direction.view_as(param), alpha=-group["lr"])
