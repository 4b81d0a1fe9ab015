"""SVD-LLM: truncation-aware data whitening (Wang et al., 2024).

With the calibration inputs as the columns of ``X`` (``in × N``), whiten by the
Cholesky factor of their second moment, take the SVD of the whitened weight, and
unwhiten the kept part:

.. math::  X X^T = S S^T, \\quad W S = U \\Sigma V^T, \\quad
           W' = U_k \\Sigma_k V_k^T S^{-1}

Because ``S⁻¹X`` has orthonormal rows, the output error on the calibration inputs is
exactly the dropped whitened spectrum (*truncation-aware*):

.. math::  \\lVert W X - W' X \\rVert_F^2 = \\sum_{i > k} \\sigma_i^2

A layer with fewer outputs than inputs needs neither ``S`` nor ``XXᵀ``: as
``U_k Σ_k V_kᵀ = U_k U_kᵀ W S``, its compressed weight is ``W' = U_k U_kᵀ W``, and ``U``,
``Σ²`` are the eigenvectors and eigenvalues of ``WS(WS)ᵀ = (WX)(WX)ᵀ`` (``out × out``). The
calibration pass gathers that matrix instead, forming ``XWᵀ`` and its Gram matrix in
float64 from each batch's inputs (``out²`` memory rather than ``in²``, 16× less for an MLP
down-projection 4× wider at its input; no Cholesky factor of size ``in``). It gives the
same ``W'`` whenever ``S`` exists, and also where ``XXᵀ`` is singular but ``(WX)(WX)ᵀ``
is not, since nothing is inverted:

.. math::  (WX)(WX)^T = U \\Sigma^2 U^T, \\quad W' = U_k U_k^T W

This route is taken with ``svd_method="auto"`` for a single- or half-precision weight; a
float64 weight keeps the exact float64 SVD of ``W S``, and a square or tall layer the
whitening (its ``XXᵀ`` is no larger than ``(WX)(WX)ᵀ``, and may be shared by q, k and v).

Damping. The output route adds ``λ W Wᵀ = W (λI) Wᵀ``, ``λ = damping · tr((WX)(WX)ᵀ) /
‖W‖²_F`` (``damping`` × the mean diagonal of ``XXᵀ`` for isotropic inputs), when there are
fewer calibration tokens than outputs or ``(WX)(WX)ᵀ`` has a lower numerical rank than
``WWᵀ`` (eigenvalues above ``max(32, 8√out)·ε₆₄`` × the largest): the directions no token
reached are then ranked by the weight itself rather than arbitrarily. Nothing is inverted
on this route, so a wide but nonzero spread of σ needs no ridge, nor does a rank the weight
itself lacks, and ``max_condition`` does not apply. The whitening route needs ``S``: when ``XXᵀ`` is singular
or ill-conditioned (fewer tokens than input features, dead channels,
``cond > max_condition``), a ridge ``λ = damping · mean(diag XXᵀ)`` is added (repeatedly
×10 until the Cholesky factor exists and is well conditioned). Either way a
:class:`CompressionWarning` names the layer: the identity then holds only
approximately, and gathering more calibration tokens is the real fix.

With ``svd_method="auto"`` on the CPU, ``W S`` is formed in float64 and its Gram matrix
decomposed in float64 (``S`` may be that ill-conditioned; see :meth:`Method.spectrum`).
The calibration second moment is summed in float64, but each batch's ``XᵀX`` of float32
activations is formed in float32 (half the cost), so its eigenvalues below about 1e-7 of
the largest are rounding; a ``max_condition`` far above 1e7 lets those directions into
``S`` (a reviewer's synthetic layer at cond 1e10 lost 0.75 % more output error than the
float64 optimum). Lower ``max_condition`` to damp such layers instead.

>>> import torch, spectrakit as sk
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
>>> report = sk.compress(model, method="svd-llm", rank=8, calibration=[torch.randn(256, 64)])
>>> report.layers["0"].rank
8
"""

from __future__ import annotations

import torch

from .. import linalg
from ..errors import SpectrakitError
from .base import Method, Spectrum, Transform
from .calibration import LayerStatistics


def _rank(eigenvalues: torch.Tensor) -> int:
    """Numerical rank of a float64 Gram matrix from its eigenvalues: those above
    ``max(32, 8√n)·ε`` of the largest (a null eigenvalue's rounding measured 1e-15 to 1e-14
    of the largest for n from 4 to 1024)."""
    n = eigenvalues.numel()
    top = float(eigenvalues.max()) if n else 0.0
    tolerance = max(32.0, 8.0 * n ** 0.5) * torch.finfo(torch.float64).eps * top
    return int((eigenvalues > tolerance).sum()) if top > 0 else 0


def whitening_factor(gram: torch.Tensor, tokens: int, name: str = "layer", damping: float = 1e-2,
                     max_condition: float = 1e10) -> tuple[torch.Tensor, float, str]:
    """Lower-triangular ``S`` with ``S Sᵀ = XᵀX + λI`` (float64), the ridge ``λ`` used (0 if
    none) and why it was needed.

    ``cond`` is estimated from the Cholesky diagonal, ``(max Sᵢᵢ / min Sᵢᵢ)²``, a lower
    bound of the condition number that costs nothing extra.
    """
    gram = gram.double()
    size = gram.shape[0]
    reason = f"only {tokens} calibration tokens for {size} input features" if tokens < size else ""
    ridge = 0.0
    scale = float(gram.diagonal().mean())
    if not scale > 0:
        raise SpectrakitError(f"svd-llm: the inputs of layer {name} are all zero on the calibration data")
    eye = torch.eye(size, dtype=gram.dtype, device=gram.device)
    step = damping * scale
    for _ in range(12):
        factor, info = torch.linalg.cholesky_ex(gram + ridge * eye if ridge else gram)
        if int(info) == 0:
            diag = factor.diagonal()
            condition = float((diag.max() / diag.min()) ** 2) if float(diag.min()) > 0 else float("inf")
            if not reason and condition <= max_condition:
                break
            if ridge and condition <= max_condition:
                break
            reason = reason or f"its input second moment is ill-conditioned (cond ≈ {condition:.1e})"
        else:
            reason = reason or "its input second moment is singular on the calibration data"
        ridge = step if not ridge else ridge * 10
    else:
        raise SpectrakitError(f"svd-llm: cannot whiten layer {name}: no Cholesky factor even with damping")
    return factor, ridge, reason if ridge else ""


class TruncationAwareSVD(Method):
    name = "svd-llm"
    needs = frozenset({"gram"})

    def __init__(self, damping: float = 1e-2, max_condition: float = 1e10) -> None:
        if not damping > 0 or not max_condition > 1:
            raise SpectrakitError(f"svd-llm: damping={damping!r} must be > 0 and max_condition={max_condition!r} > 1")
        self.damping = float(damping)
        self.max_condition = float(max_condition)
        self.ridges: dict[str, float] = {}
        self.damped: dict[str, str] = {}

    def transform(self, name: str, W: torch.Tensor, stats: LayerStatistics | None) -> Transform:
        assert stats is not None and stats.gram is not None
        factor, ridge, reason = whitening_factor(stats.gram, stats.tokens, name, self.damping, self.max_condition)
        self.ridges[name] = ridge
        if ridge:
            self.damped[name] = f"{reason} (λ = {ridge / float(stats.gram.diagonal().mean()):.0e} × mean diagonal)"
        return Transform(right=factor)

    def uses_output_gram(self, W: torch.Tensor, svd_method: str = "auto") -> bool:
        out_features, in_features = W.shape
        return svd_method == "auto" and W.dtype != torch.float64 and out_features < in_features

    def spectrum(self, name: str, W: torch.Tensor, stats: LayerStatistics | None,
                 svd_method: str = "auto") -> Spectrum:
        """Through ``stats.output_gram`` where :meth:`uses_output_gram` chose it, else
        through the whitened weight ``W S`` (:meth:`Method.spectrum`)."""
        if stats is None or stats.output_gram is None:
            return super().spectrum(name, W, stats, svd_method)
        gram, out_features = stats.output_gram.to(W.device), W.shape[0]
        weight = W.to(gram.dtype)
        energy, weight_energy = float(gram.diagonal().sum()), float(weight.square().sum())
        if not energy > 0 and weight_energy > 0:
            raise SpectrakitError(f"svd-llm: the inputs of layer {name} are all zero on the calibration data "
                                  "(or orthogonal to its weight)")
        S, U = linalg.gram_spectrum(gram)
        self.ridges[name] = 0.0
        # nothing is inverted here, so only a rank the data left short calls for the ridge: not
        # a wide spread of σ (float64 resolves it), nor a rank W itself lacks (λWWᵀ has no
        # more of it to give); WWᵀ is formed only when the data's rank falls short
        data_rank = _rank(S.square())
        short = stats.tokens < out_features or data_rank < out_features
        weight_gram = linalg.gram(weight.mT) if short else None
        if stats.tokens < out_features:
            reason = f"only {stats.tokens} calibration tokens for {out_features} outputs"
        elif short and _rank(torch.linalg.eigvalsh(weight_gram)) > data_rank:
            reason = "its output second moment is singular: the calibration inputs reach too few directions"
        else:
            reason = ""
        if reason and weight_energy > 0 and weight_gram is not None:  # a reason implies `short`
            ridge = self.damping * energy / weight_energy
            S, U = linalg.gram_spectrum(gram + ridge * weight_gram)
            self.ridges[name] = ridge
            self.damped[name] = f"{reason} (λ = {self.damping:.0e} × the mean input energy along W)"
        return Spectrum(S, Transform(), U=U.float(), weight=W)

    def warnings(self) -> list[str]:
        if not self.damped:
            return []
        examples = "; ".join(f"{name}: {why}" for name, why in list(self.damped.items())[:3])
        more = f"; and {len(self.damped) - 3} more" if len(self.damped) > 3 else ""
        return [f"svd-llm damped the calibration second moment of {len(self.damped)} of {len(self.ridges)} layers "
                f"({examples}{more}); "
                "the truncation loss is approximate there; more (and more varied) calibration tokens is the real fix"]
