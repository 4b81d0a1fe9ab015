"""Shape the spectrum while training: penalties (callables returning a scalar loss) and parametrizations.

Weight penalties are built from a model (or a dict / list of tensors) with ``include`` /
``exclude`` name patterns and ``kinds``; calling one returns a scalar to add to the loss:

>>> import torch, spectrakit as sk
>>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
>>> spectral = sk.regularize.SpectralPenalty(model, target=1.0)
>>> x, y = torch.randn(8, 16), torch.randint(0, 10, (8,))
>>> loss = torch.nn.functional.cross_entropy(model(x), y) + 1e-2 * spectral()
>>> loss.backward()

=============================  ==================================================================
weights                        :class:`SpectralPenalty`, :class:`L2Penalty`, :class:`L2ToInit`,
                               :class:`WassersteinToInit`, :class:`SoftOrthogonality`,
                               :class:`OrthogonalConvPenalty`, :class:`NuclearNormPenalty`,
                               :class:`HypersphericalEnergy`, :class:`CauchySchwarzOrthogonality`,
                               :class:`CauchySchwarzDiscrete`, :class:`LipschitzPenalty`,
                               :class:`LambdaOrthogonality`
features (take activations)    :class:`VNE`, :class:`VICReg`, :class:`INTL`, :class:`JacobianPenalty`,
                               :class:`LDReg`; vectors: :class:`CauchySchwarzEigenvector`
parametrizations               :func:`spectral_normalize`, :func:`weight_normalize`,
                               :func:`learnable_multipliers`, :func:`remove_parametrizations`
layers and training recipes    :class:`CompatibleMap` (λ-orthogonal affine map), :class:`LowRankLinear` +
                               :class:`ApproximateOrthonormality`, :func:`orthonormal_modulation`
                               (:func:`orthonormal_init_`, :func:`backward_modulation`), SINDER
                               (:func:`singular_defects`, :func:`singular_value_finetune`,
                               :func:`neighbor_loss`, :func:`sinder_repair`)
=============================  ==================================================================
"""

from ._base import Penalty
from .cauchy_schwarz import CauchySchwarzDiscrete, CauchySchwarzEigenvector, CauchySchwarzOrthogonality
from .hyperspherical import HypersphericalEnergy
from .intl import INTL
from .jacobian import JacobianPenalty
from .lambda_orthogonality import CompatibleMap, LambdaOrthogonality
from .ldreg import LDReg
from .lipschitz import LipschitzPenalty
from .low_rank import ApproximateOrthonormality, LowRankLinear
from .modulation import backward_modulation, orthonormal_init_, orthonormal_modulation
from .nuclear import NuclearNormPenalty
from .orthogonal_conv import OrthogonalConvPenalty
from .orthogonality import SoftOrthogonality
from .parametrize import learnable_multipliers, remove_parametrizations, spectral_normalize, weight_normalize
from .sinder import (
    DefectReport,
    SingularValueShift,
    block_linearization,
    defect_layers,
    neighbor_loss,
    sinder_repair,
    singular_defects,
    singular_value_finetune,
)
from .spectral import SpectralPenalty
from .to_init import L2Penalty, L2ToInit, WassersteinToInit
from .vicreg import VICReg
from .vne import VNE

__all__ = [
    "ApproximateOrthonormality", "CauchySchwarzDiscrete", "CauchySchwarzEigenvector", "CompatibleMap",
    "DefectReport", "LDReg", "LambdaOrthogonality", "LowRankLinear", "SingularValueShift",
    "backward_modulation", "block_linearization", "defect_layers", "neighbor_loss", "orthonormal_init_",
    "orthonormal_modulation", "singular_defects", "singular_value_finetune", "sinder_repair",
    "CauchySchwarzOrthogonality", "HypersphericalEnergy", "INTL", "JacobianPenalty", "L2Penalty", "L2ToInit",
    "LipschitzPenalty", "NuclearNormPenalty", "OrthogonalConvPenalty", "Penalty", "SoftOrthogonality",
    "SpectralPenalty", "VICReg", "VNE", "WassersteinToInit", "learnable_multipliers",
    "remove_parametrizations", "spectral_normalize", "weight_normalize",
]
