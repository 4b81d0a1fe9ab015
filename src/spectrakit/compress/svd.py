"""Plain truncated SVD: keep the top-``k`` singular triplets of the weight itself.

.. math::  W = U \\Sigma V^T \\;\\Rightarrow\\; W' = U_k \\Sigma_k V_k^T

The loss of dropping ``σᵢ`` is ``σᵢ²`` of the *weight* (Frobenius error, Eckart–Young
optimal); no calibration data is used. Being a function of the weight alone, its spectrum can
come from a :class:`~spectrakit.SpectrumCache` (``compress(..., cache=DIR)``): the cache keeps
exactly what :meth:`Method.spectrum` computes (singular values and vectors, in their precision
and memory layout), and the factors of the rank kept, so a cached run gives the same compressed
weights bit for bit and a warm run does no ``m·n·k`` product to form them.

>>> import torch, spectrakit as sk
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
>>> report = sk.compress(model, method="svd", rank=8)
>>> report.layers["0"].rank
8
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import SpectrumCache, active_cache, content_fingerprint
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
        :func:`~spectrakit.cache.active_cache`) when there is one; so are the factors of the
        rank then kept (:class:`CachedFactorsSpectrum`)."""
        cache = self.cache if self.cache is not None else active_cache()
        if cache is None:
            return super().spectrum(name, W, stats, svd_method)

        def compute() -> dict[str, torch.Tensor]:
            return _spectrum_tensors(super(PlainSVD, self).spectrum(name, W, stats, svd_method))

        content = content_fingerprint(W)  # one hash of the weight serves both of its entries
        found = cache.tensors(W, compute=compute, method=f"compress-svd:{svd_method}", fingerprint=content)
        if "vectors" in found:  # a Gram eigensolve: one side's vectors, the other formed from W later
            vectors = found["vectors"]
            tall = bool(found["tall"])
            return CachedFactorsSpectrum(found["S"], Transform(), U=None if tall else vectors,
                                         Vh=vectors.mT if tall else None, weight=W, cache=cache, content=content,
                                         svd_method=svd_method)
        return CachedFactorsSpectrum(found["S"], Transform(), U=found["U"], Vh=found["Vh"], weight_key=W, cache=cache,
                                     content=content, svd_method=svd_method)


@dataclass
class CachedFactorsSpectrum(Spectrum):
    """A plain-svd :class:`Spectrum` whose :meth:`factors` also go through the spectrum cache.

    Forming the factors of the kept rank is most of a warm run's work without it: from a Gram
    eigensolve one side is ``W V_k`` (or ``U_kᵀ W``), an ``m·n·k`` product. They are keyed by
    the weight's fingerprint (the one of its spectrum), ``svd_method``, the rank and the dtype,
    so a hit gives the factors the uncached run computes, bit for bit.

    Attributes:
        cache: the spectrum cache.
        content: ``content_fingerprint`` of the weight.
        svd_method: the method the spectrum was computed with.
        weight_key: the weight, where ``weight`` is not kept (a full SVD), for the key's dtype
            and device.
    """

    cache: SpectrumCache | None = None
    content: str = ""
    svd_method: str = "auto"
    weight_key: torch.Tensor | None = None

    def factors(self, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up, down)`` of the rank-``rank`` truncation (see :meth:`Spectrum.factors`), from
        the cache or computed and stored.

        Args:
            rank: the rank kept.
            dtype: the factors' dtype (the layer's).
        """
        W = self.weight if self.weight is not None else self.weight_key
        if self.cache is None or W is None:
            return super().factors(rank, dtype)

        def compute() -> dict[str, torch.Tensor]:
            up, down = super(CachedFactorsSpectrum, self).factors(rank, dtype)
            return {"up": up, "down": down}

        found = self.cache.tensors(W, compute=compute, fingerprint=self.content,
                                   method=f"compress-svd-factors:{self.svd_method}:{rank}:"
                                          f"{str(dtype).removeprefix('torch.')}")
        return found["up"], found["down"]


def _spectrum_tensors(spectrum: Spectrum) -> dict[str, torch.Tensor]:
    """What a :class:`Spectrum` of the plain SVD holds, as tensors the cache can store."""
    if spectrum.weight is not None:  # Gram path: exactly one side is known
        tall = spectrum.U is None
        vectors = spectrum.Vh.mT if tall else spectrum.U  # type: ignore[union-attr]
        assert vectors is not None
        return {"S": spectrum.S, "vectors": vectors, "tall": torch.tensor(tall)}
    assert spectrum.U is not None and spectrum.Vh is not None
    return {"S": spectrum.S, "U": spectrum.U, "Vh": spectrum.Vh}
