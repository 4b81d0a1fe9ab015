"""Soft orthogonality of weight matrices, four ways.

``G`` is the smaller Gram matrix of the canonical ``out × in`` weight ``W`` (conv kernels
reshaped to ``out × in·k…``): ``WᵀW`` when ``W`` is tall, ``WWᵀ`` when wide — the side
that *can* be orthonormal.

=========  =====================================  ============================================
mode       penalty                                zero when
=========  =====================================  ============================================
``so``     ``‖G − I‖²_F``                         ``W`` is (semi-)orthogonal
``srip``   ``σ₁(G − I)``  (Bansal et al., 2018)   same; penalizes the worst direction only
``biggan`` ``‖G ⊙ (1 − I)‖²_F``  (Brock et al.)   the columns (rows) are orthogonal, any norms
``group``  ``Σ_g ‖W_g W_gᵀ − I‖²_F``  (GOR)       the rows (filters) within each group are
                                                  orthonormal; groups are the conv's own
                                                  groups, or ``groups=``, or the fewest that
                                                  fit ``in`` rows each
=========  =====================================  ============================================

SRIP's σ₁ uses a persistent :class:`spectrakit.linalg.PowerIteration` (``method="power"``)
or the SVD (``method="exact"``); ``"auto"`` (default) takes the SVD when ``G`` is at most
64 × 64 — there it costs about as much as a power step — and power iteration above. Power
iteration needs a gap under σ₁(G − I): for tiny weights (``G ≈ 0``, so ``G − I ≈ −I``) the
top singular value is nearly multiple, its gradient ill-defined, and the SVD is the safer choice.

>>> import torch, spectrakit as sk
>>> layer = torch.nn.Linear(8, 8)
>>> _ = torch.nn.init.orthogonal_(layer.weight)
>>> [round(sk.regularize.SoftOrthogonality(layer, mode=m)().item(), 4) for m in ("so", "srip", "biggan", "group")]
[0.0, 0.0, 0.0, 0.0]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import SpectrakitError
from ..linalg import PowerIteration
from ._base import Patterns, Penalty, Target
from ._operators import top_singular_value, warm_up

MODES = ("so", "srip", "biggan", "group")
EXACT_SRIP_SIDE = 64


def smaller_gram(W: torch.Tensor) -> torch.Tensor:
    """``WᵀW`` for a tall (or square) ``W``, ``WWᵀ`` for a wide one."""
    return W.mT @ W if W.shape[0] >= W.shape[1] else W @ W.mT


class SoftOrthogonality(Penalty):
    """Soft orthogonality penalty; see the module docstring for the four ``mode``s.

    Args:
        seed: seed of the power iteration's starting vectors (``srip``).
        mode: ``"so"``, ``"srip"``, ``"biggan"`` or ``"group"``.
        groups: number of row groups for ``mode="group"`` (default: the conv's ``groups``
            when above 1, else ``⌈out / in⌉`` so that each group can be orthonormal).
        method, n_iter: σ₁ for ``srip``: ``"auto"``, ``"power"`` (persistent vectors) or ``"exact"``.
        include, exclude, kinds, reduction: see :class:`~spectrakit.regularize.SpectralPenalty`.
    """

    default_kinds = ("linear", "conv1d", "conv2d", "matrix")

    def __init__(self, source: nn.Module | Mapping[str, torch.Tensor] | Iterable[Any], mode: str = "so", *,
                 groups: int | None = None, method: str = "auto", n_iter: int = 1, seed: int = 0,
                 include: Patterns = None, exclude: Patterns = None, kinds: str | Iterable[str] | None = None,
                 reduction: str = "sum") -> None:
        if mode not in MODES:
            raise SpectrakitError(f"mode={mode!r} is not one of {', '.join(MODES)}")
        if method not in ("auto", "power", "exact"):
            raise SpectrakitError(f"method={method!r} is not one of auto, power, exact")
        if groups is not None and (not isinstance(groups, int) or groups < 1):
            raise SpectrakitError(f"groups={groups!r} must be a positive integer")
        super().__init__(source, include=include, exclude=exclude, kinds=kinds, reduction=reduction)
        self.mode, self.groups, self.method = mode, groups, method
        self.states = [PowerIteration(n_iter, seed=seed + i) for i in range(len(self.targets))]

    def group_count(self, target: Target, W: torch.Tensor) -> int:
        if self.groups is not None:
            count = self.groups
        elif int(target.conv_option("groups", 1)) > 1:
            count = int(target.conv_option("groups", 1))
        else:
            count = math.ceil(W.shape[0] / W.shape[1])
        if count > W.shape[0]:
            raise SpectrakitError(f"parameter {target.name!r}: groups={count} exceeds its {W.shape[0]} rows")
        return count

    def term(self, target: Target, index: int) -> torch.Tensor:
        W = target.matrix()
        if self.mode == "group":
            parts = W.tensor_split(self.group_count(target, W), dim=0)
            return torch.stack([_minus_identity(part @ part.mT).square().sum() for part in parts]).sum()
        G = smaller_gram(W)
        if self.mode == "so":
            return _minus_identity(G).square().sum()
        if self.mode == "biggan":
            return (G - torch.diag_embed(G.diagonal())).square().sum()
        D = _minus_identity(G)
        method = self.method
        if method == "auto":
            method = "exact" if D.shape[-1] <= EXACT_SRIP_SIDE else "power"
        if method == "power":
            warm_up(self.states[index], D, 50)
        return top_singular_value(D, method, self.states[index])


def _minus_identity(G: torch.Tensor) -> torch.Tensor:
    """``G − I`` without allocating the identity."""
    return G - torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
