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
                               :class:`LipschitzPenalty`
features (take activations)    :class:`VNE`, :class:`VICReg`, :class:`INTL`, :class:`JacobianPenalty`
parametrizations               :func:`spectral_normalize`, :func:`weight_normalize`,
                               :func:`learnable_multipliers`, :func:`remove_parametrizations`
=============================  ==================================================================
"""

from ._base import Penalty
from .cauchy_schwarz import CauchySchwarzOrthogonality
from .hyperspherical import HypersphericalEnergy
from .intl import INTL
from .jacobian import JacobianPenalty
from .lipschitz import LipschitzPenalty
from .nuclear import NuclearNormPenalty
from .orthogonal_conv import OrthogonalConvPenalty
from .orthogonality import SoftOrthogonality
from .parametrize import learnable_multipliers, remove_parametrizations, spectral_normalize, weight_normalize
from .spectral import SpectralPenalty
from .to_init import L2Penalty, L2ToInit, WassersteinToInit
from .vicreg import VICReg
from .vne import VNE

__all__ = [
    "CauchySchwarzOrthogonality", "HypersphericalEnergy", "INTL", "JacobianPenalty", "L2Penalty", "L2ToInit",
    "LipschitzPenalty", "NuclearNormPenalty", "OrthogonalConvPenalty", "Penalty", "SoftOrthogonality",
    "SpectralPenalty", "VICReg", "VNE", "WassersteinToInit", "learnable_multipliers",
    "remove_parametrizations", "spectral_normalize", "weight_normalize",
]
