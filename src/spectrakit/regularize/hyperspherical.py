"""Minimum hyperspherical energy (MHE): neurons spread out evenly on the unit sphere.

With ``ŵ_i = w_i / ‖w_i‖`` the unit-norm rows (neurons, or conv filters) of a weight,

    E_s = 1/(N(N−1)) · Σ_{i≠j} f_s(‖ŵ_i − ŵ_j‖),   f_s(r) = r^{−s} (s > 0),  log(1/r) (s = 0)

(Liu et al., *Learning towards Minimum Hyperspherical Energy*, NeurIPS 2018) — the Riesz
``s``-energy of the neurons as charged particles on the sphere. It is invariant to each
neuron's norm and minimal for the most spread configuration: for ``N ≤ d + 1`` neurons in
``d`` dimensions, a regular simplex (all pairwise cosines ``−1/(N−1)``). ``half_space=True``
also repels each neuron from the others' antipodes (``−ŵ_j``), since ``w`` and ``−w`` span
the same direction.

>>> import torch, spectrakit as sk
>>> layer = torch.nn.Linear(3, 4, bias=False)
>>> penalty = sk.regularize.HypersphericalEnergy(layer, s=2)
>>> bool(penalty() > 0)
True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import SpectrakitError
from ._base import Patterns, Penalty, Target


class HypersphericalEnergy(Penalty):
    """Mean Riesz ``s``-energy of each layer's normalized rows (``s=0``: logarithmic energy).

    Args:
        s: the energy's power (``s ≥ 0``); 2 by default.
        half_space: also count the distances to the other neurons' antipodes.
        eps: floor on squared distances, so two identical neurons give a large finite energy.
    """

    default_kinds = ("linear", "conv1d", "conv2d", "matrix")

    def __init__(self, source: nn.Module | Mapping[str, torch.Tensor] | Iterable[Any], s: float = 2.0, *,
                 half_space: bool = False, eps: float = 1e-6, include: Patterns = None, exclude: Patterns = None,
                 kinds: str | Iterable[str] | None = None, reduction: str = "sum") -> None:
        if not s >= 0:
            raise SpectrakitError(f"s={s!r} must be ≥ 0")
        super().__init__(source, include=include, exclude=exclude, kinds=kinds, reduction=reduction)
        self.s, self.half_space, self.eps = float(s), half_space, eps
        for target in self.targets:
            if target.matrix().shape[0] < 2:
                raise SpectrakitError(f"HypersphericalEnergy: parameter {target.name!r} has one neuron; "
                                      "the energy needs at least two rows")

    def energy(self, squared_distance: torch.Tensor) -> torch.Tensor:
        d2 = squared_distance.clamp_min(self.eps)
        return -0.5 * d2.log() if self.s == 0 else d2 ** (-self.s / 2)

    def term(self, target: Target, index: int) -> torch.Tensor:
        W = target.matrix()
        unit = W / torch.linalg.vector_norm(W, dim=1, keepdim=True).clamp_min(torch.finfo(W.dtype).tiny)
        cosine = unit @ unit.mT
        i, j = torch.triu_indices(W.shape[0], W.shape[0], offset=1, device=W.device)
        cos_pairs = cosine[i, j]  # each unordered pair once; the i≠j mean is the same
        value = self.energy(2 - 2 * cos_pairs).mean()
        if self.half_space:
            value = value + self.energy(2 + 2 * cos_pairs).mean()
        return value
