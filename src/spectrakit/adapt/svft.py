"""SVFT: a sparse update in the basis of W's own singular vectors (Lingam et al., 2024).

With the top-r triplets ``U_r, V_r`` of ``W`` (frozen) and a sparse ``M ∈ ℝ^{r×r}``
whose non-zeros (a fixed pattern) are the only trainable parameters (zeros at init):

    ΔW = U_r M V_rᵀ,     y = x Wᵀ + b + ((x V_r) Mᵀ) U_rᵀ.

Patterns (``pattern=``, width ``d = width``):

=============  =============================================  =========================
``diagonal``   ``M = diag(m)`` (SVFT-plain)                    ``r``
``banded``     ``|i − j| ≤ d``                                  ``r(2d+1) − d(d+1)``
``random``     diagonal + ``d`` random off-diagonal per row     ``r(1 + d)``
               (``seed``)
``top-k``      diagonal + the ``r·d`` off-diagonal ``(i, j)``   ``r(1 + d)``
               with the largest alignment ``|u_iᵀ v_j|`` (on the
               first ``min(out, in)`` coordinates)
=============  =============================================  =========================

(``r`` singular vectors here; the paper uses all of them, i.e. ``rank = min(out, in)``
minus one at most in spectrakit.) Exact at initialization (``M = 0``).

>>> import torch, spectrakit as sk
>>> model = sk.adapt(torch.nn.Sequential(torch.nn.Linear(64, 32)), "svft", rank=8, pattern="banded", width=1)
>>> sk.trainable_parameters(model)
22
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import SpectrakitError
from .base import AdaptedLinear, register

PATTERNS = ("diagonal", "banded", "random", "top-k")


def sparsity_pattern(pattern: str, rank: int, width: int, U: torch.Tensor, Vh: torch.Tensor,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of M's trainable entries, sorted row-major."""
    eye = torch.eye(rank, dtype=torch.bool)
    if pattern == "diagonal":
        mask = eye
    elif pattern == "banded":
        index = torch.arange(rank)
        mask = (index[:, None] - index[None, :]).abs() <= width
    elif pattern == "random":
        generator = torch.Generator().manual_seed(seed)
        mask = eye.clone()
        for i in range(rank):
            others = torch.tensor([j for j in range(rank) if j != i], dtype=torch.long)
            pick = others[torch.randperm(len(others), generator=generator)[:width]]
            mask[i, pick] = True
    elif pattern == "top-k":
        common = min(U.shape[0], Vh.shape[1])
        alignment = (U[:common].T.double() @ Vh[:, :common].T.double()).abs()
        alignment[eye] = -1.0  # the diagonal is always in
        chosen = alignment.flatten().topk(min(rank * width, rank * (rank - 1))).indices
        mask = eye.clone().flatten()
        mask[chosen] = True
        mask = mask.view(rank, rank)
    else:
        raise SpectrakitError(f"pattern={pattern!r} must be one of {', '.join(PATTERNS)}")
    rows, cols = mask.nonzero(as_tuple=True)
    return rows, cols


@register
class SVFTLinear(AdaptedLinear):
    method = "svft"
    options = ("pattern", "width", "seed", "svd_method")
    # buffers and parameters, typed here (nn.Module.__getattr__ would give Tensor | Module)
    U: torch.Tensor
    Vh: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    values: nn.Parameter

    def __init__(self, base_layer: nn.Module, rank: int, *, name: str = "", pattern: str = "diagonal",
                 width: int = 1, seed: int = 0, svd_method: str = "krylov",
                 init: dict[str, Any] | None = None) -> None:
        super().__init__(base_layer, rank, name=name)
        self.pattern, self.width, self.seed, self.svd_method = pattern, int(width), int(seed), svd_method
        U, _, Vh = self.factors(rank, "top", svd_method)
        rows, cols = sparsity_pattern(pattern, rank, self.width, U, Vh, self.seed)
        self.new_buffer("U", U)
        self.new_buffer("Vh", Vh)
        device = self.base_layer.weight.device
        self.register_buffer("rows", rows.to(device), persistent=False)
        self.register_buffer("cols", cols.to(device), persistent=False)
        self.values = self.new_parameter(torch.zeros(len(rows)))

    @classmethod
    def check_layer(cls, name: str, out_features: int, in_features: int, kwargs: dict[str, Any]) -> None:
        super().check_layer(name, out_features, in_features, kwargs)
        if kwargs.get("pattern", "diagonal") not in PATTERNS:
            raise SpectrakitError(f"pattern={kwargs['pattern']!r} must be one of {', '.join(PATTERNS)}")
        width = kwargs.get("width", 1)
        if not isinstance(width, int) or width < 0 or (width >= kwargs["rank"] and
                                                       kwargs.get("pattern") in ("random", "banded")):
            raise SpectrakitError(f"width={width!r} must be an integer in 0..{kwargs['rank'] - 1} "
                                  f"for layer {name}")

    def coefficients(self) -> torch.Tensor:
        """The dense ``r × r`` matrix ``M``."""
        M = torch.zeros(self.rank, self.rank, dtype=self.values.dtype, device=self.values.device)
        return M.index_put((self.rows, self.cols), self.values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer(x)
        update = ((self.adapter_input(x) @ self.Vh.T) @ self.coefficients().T) @ self.U.T
        return base + update.to(base.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.U @ self.coefficients() @ self.Vh
