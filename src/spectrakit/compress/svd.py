"""Plain truncated SVD: keep the top-``k`` singular triplets of the weight itself.

.. math::  W = U \\Sigma V^T \\;\\Rightarrow\\; W' = U_k \\Sigma_k V_k^T

The loss of dropping ``σᵢ`` is ``σᵢ²`` of the *weight* (Frobenius error, Eckart–Young
optimal); no calibration data is used. Being a function of the weight alone, its spectrum can
come from a :class:`~spectrakit.SpectrumCache` (``compress(..., cache=DIR)``): the cache keeps
exactly what :meth:`Method.spectrum` computes (singular values and vectors, in their precision
and memory layout), so a cached run gives the same compressed weights bit for bit.

>>> import torch, spectrakit as sk
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
>>> report = sk.compress(model, method="svd", rank=8)
>>> report.layers["0"].rank
8
"""

from __future__ import annotations

import torch

from ..cache import active_cache
from .base import Method, Spectrum, Transform
from .calibration import LayerStatistics


class PlainSVD(Method):
    name = "svd"
    needs = frozenset()

    def transform(self, name: str, W: torch.Tensor, stats: LayerStatistics | None) -> Transform:
        return Transform()

    def spectrum(self, name: str, W: torch.Tensor, stats: LayerStatistics | None,
                 svd_method: str = "auto") -> Spectrum:
        """:meth:`Method.spectrum`, read from or written to ``self.cache`` (or the
        :func:`~spectrakit.cache.active_cache`) when there is one."""
        cache = self.cache if self.cache is not None else active_cache()
        if cache is None:
            return super().spectrum(name, W, stats, svd_method)

        def compute() -> dict[str, torch.Tensor]:
            return _spectrum_tensors(super(PlainSVD, self).spectrum(name, W, stats, svd_method))

        found = cache.tensors(W, compute=compute, method=f"compress-svd:{svd_method}")
        if "vectors" in found:  # a Gram eigensolve: one side's vectors, the other formed from W later
            vectors = found["vectors"]
            tall = bool(found["tall"])
            return Spectrum(found["S"], Transform(), U=None if tall else vectors, Vh=vectors.mT if tall else None,
                            weight=W)
        return Spectrum(found["S"], Transform(), U=found["U"], Vh=found["Vh"])


def _spectrum_tensors(spectrum: Spectrum) -> dict[str, torch.Tensor]:
    """What a :class:`Spectrum` of the plain SVD holds, as tensors the cache can store."""
    if spectrum.weight is not None:  # Gram path: exactly one side is known
        tall = spectrum.U is None
        vectors = spectrum.Vh.mT if tall else spectrum.U  # type: ignore[union-attr]
        assert vectors is not None
        return {"S": spectrum.S, "vectors": vectors, "tall": torch.tensor(tall)}
    assert spectrum.U is not None and spectrum.Vh is not None
    return {"S": spectrum.S, "U": spectrum.U, "Vh": spectrum.Vh}
