"""FourierFT: a weight update with a few trainable 2-D Fourier coefficients (Gao et al., 2024).

``n`` frequencies ``(pₖ, qₖ)`` are drawn once (``seed``) from the ``out × in`` grid; their
coefficients ``c ∈ ℝⁿ`` train, starting at zero:

    F = Σₖ cₖ e_{pₖ} e_{qₖ}ᵀ,    ΔW = α · Re(IDFT₂(F)),    y = x Wᵀ + b + x ΔWᵀ,

with ``IDFT₂`` the inverse 2-D DFT normalized by ``1/(out·in)`` (``torch.fft.ifft2``)
and ``α = scaling`` (150 by default, as in the paper). Exact at initialization
(``c = 0``). Trainable parameters per layer: ``n = min(n_frequencies, out·in)``
(default 1000); ``rank`` only passes the usual validation.

>>> import torch, spectrakit as sk
>>> model = sk.adapt(torch.nn.Sequential(torch.nn.Linear(64, 32)), "fourierft", n_frequencies=100)
>>> sk.trainable_parameters(model)
100
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import SpectrakitError
from .base import AdaptedLinear, register


@register
class FourierFTLinear(AdaptedLinear):
    method = "fourierft"
    options = ("n_frequencies", "scaling", "seed")
    # buffers and parameters, typed here (nn.Module.__getattr__ would give Tensor | Module)
    rows: torch.Tensor
    cols: torch.Tensor
    coefficients: nn.Parameter

    def __init__(self, base_layer: nn.Module, rank: int, *, name: str = "", n_frequencies: int = 1000,
                 scaling: float = 150.0, seed: int = 0, init: dict[str, Any] | None = None) -> None:
        super().__init__(base_layer, rank, name=name)
        self.n_frequencies = min(n_frequencies, self.out_features * self.in_features)
        self.scaling, self.seed = float(scaling), int(seed)
        generator = torch.Generator().manual_seed(self.seed)
        flat = torch.randperm(self.out_features * self.in_features, generator=generator)[: self.n_frequencies]
        device = self.base_layer.weight.device
        self.register_buffer("rows", (flat // self.in_features).to(device), persistent=False)
        self.register_buffer("cols", (flat % self.in_features).to(device), persistent=False)
        self.coefficients = self.new_parameter(torch.zeros(self.n_frequencies))

    @classmethod
    def check_layer(cls, name: str, out_features: int, in_features: int, kwargs: dict[str, Any]) -> None:
        super().check_layer(name, out_features, in_features, kwargs)
        n = kwargs.get("n_frequencies", 1000)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise SpectrakitError(f"n_frequencies={n!r} must be a positive integer")

    def delta_weight(self) -> torch.Tensor:
        spectrum = torch.zeros(self.out_features, self.in_features, dtype=self.coefficients.dtype,
                               device=self.coefficients.device)
        spectrum = spectrum.index_put((self.rows, self.cols), self.coefficients)
        return self.scaling * torch.fft.ifft2(spectrum).real

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer(x)
        return base + (self.adapter_input(x) @ self.delta_weight().T).to(base.dtype)
