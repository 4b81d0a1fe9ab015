"""SVD-LLM V2: loss-optimized truncation and heterogeneous ratios (Wang et al., 2025).

**Truncation.** Two rounds of SVD replace SVD-LLM's Cholesky factor: the calibration
inputs' second moment is decomposed first, ``XXᵀ = U_s Λ U_sᵀ``, which gives the whitening
``S = U_s Λ^{1/2}`` (``S Sᵀ = XXᵀ``, for any ``XXᵀ``, singular or not); the second SVD is that
of ``W S``:

.. math::  X X^T = U_s \\Lambda U_s^T, \\quad W U_s \\Lambda^{1/2} = U \\Sigma V^T, \\quad
           W' = U_k \\Sigma_k V_k^T \\Lambda^{-1/2} U_s^T = U_k U_k^T W

The last form follows from ``Σ_k V_kᵀ = U_kᵀ W S`` and needs no inverse, so a
direction no calibration token reached is neither amplified nor damped: it is projected
like the rest. The output error on the calibration inputs is exactly the dropped spectrum,
``‖WX − W'X‖²_F = Σ_{i>k} σᵢ²``, the paper's theoretical minimum, without a ridge. The
second SVD is taken through the ``out × out`` Gram matrix ``W S Sᵀ Wᵀ = W XXᵀ Wᵀ`` in float64,
so ``S`` itself is never formed. Where it is cheaper, that matrix is formed another way (each
gives the same ``Σ`` and ``U``): a wide layer (``out < in``) gathers it during calibration from
its outputs, as svd-llm does, instead of the larger ``XXᵀ``; a tall one (``out > in``) takes
``W = QR`` and decomposes the ``in × in`` matrix ``R XXᵀ Rᵀ`` (``U = Q U_R``) instead of the
larger ``out × out`` one.

**Heterogeneous ratios** (``allocation="heterogeneous"``, the default for this method;
:func:`spectrakit.compress.allocation.heterogeneous_ratios`): matrices of one type (the
same name up to the layer index, and the same shape) share their type's budget, each
receiving a ratio that falls with its theoretical truncation loss at the uniform ratio.

>>> import torch, spectrakit as sk
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
>>> report = sk.compress(model, method="svd-llm-v2", rank=8, calibration=[torch.randn(256, 64)])
>>> report.layers["0"].rank
8
"""

from __future__ import annotations

import torch

from .. import linalg
from ..errors import SpectrakitError
from .base import Method, Spectrum, Transform
from .calibration import LayerStatistics


class LossOptimizedSVD(Method):
    name = "svd-llm-v2"
    needs = frozenset({"gram"})
    default_allocation = "heterogeneous"

    def transform(self, name: str, W: torch.Tensor, stats: LayerStatistics | None) -> Transform:
        """``W S`` with ``S = U_s Λ^{1/2}`` (the first SVD); used by :meth:`spectrum`."""
        assert stats is not None and stats.gram is not None
        root, vectors = linalg.gram_spectrum(stats.gram.double())  # √Λ and U_s of XXᵀ
        return Transform(right=vectors * root[None, :])

    def uses_output_gram(self, W: torch.Tensor, svd_method: str = "auto") -> bool:
        """A wide layer's ``W XXᵀ Wᵀ`` is gathered during calibration (smaller than ``XXᵀ``), as in svd-llm."""
        out_features, in_features = W.shape
        return svd_method == "auto" and W.dtype != torch.float64 and out_features < in_features

    def spectrum(self, name: str, W: torch.Tensor, stats: LayerStatistics | None,
                 svd_method: str = "auto") -> Spectrum:
        """``Σ`` and ``U`` of ``W S`` from ``(W S)(W S)ᵀ = W XXᵀ Wᵀ``; the kept factors are
        ``U_k`` and ``U_kᵀ W`` (see the module docstring)."""
        assert stats is not None and (stats.gram is not None or stats.output_gram is not None)
        weight = W.to(torch.float64)
        basis = None  # Q of a tall W = QR: then U = Q U_R
        if stats.output_gram is not None:
            output_gram = stats.output_gram.to(W.device, torch.float64)
        else:
            assert stats.gram is not None
            gram = stats.gram.to(W.device, torch.float64)
            if weight.shape[0] > weight.shape[1]:
                basis, R = torch.linalg.qr(weight)
                output_gram = R @ gram @ R.mT  # W XXᵀ Wᵀ = Q (R XXᵀ Rᵀ) Qᵀ
            else:
                output_gram = weight @ gram @ weight.mT
        if not float(output_gram.diagonal().sum()) > 0 and float(weight.square().sum()) > 0:
            raise SpectrakitError(f"svd-llm-v2: the inputs of layer {name} are all zero on the calibration data "
                                  "(or orthogonal to its weight)")
        S, U = linalg.gram_spectrum(output_gram)
        if basis is not None:
            U = basis @ U
        return Spectrum(S, Transform(), U=U.to(torch.float32 if W.dtype != torch.float64 else torch.float64),
                        weight=W, precise=True)
