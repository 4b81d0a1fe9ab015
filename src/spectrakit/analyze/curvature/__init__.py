"""Curvature of the loss and of training: Hessian, GGN and Fisher spectra, gradient
alignment, and the training Jacobian.

>>> import torch, spectrakit as sk
>>> model = torch.nn.Linear(3, 2)
>>> x, y = torch.randn(16, 3), torch.randn(16, 2)
>>> h = sk.analyze.hessian(model, torch.nn.functional.mse_loss, [(x, y)])
>>> h.size
8
"""

from .alignment import gradient_alignment
from .density import Density, exact_density, slq_density
from .estimators import TraceEstimate, hutch_plus_plus, hutchinson
from .operators import CurvatureOperator
from .spectra import Curvature, TopEigen, hessian
from .training_jacobian import TrainingJacobian, sgd_train_step, training_jacobian

__all__ = ["Curvature", "CurvatureOperator", "Density", "TopEigen", "TraceEstimate", "exact_density",
           "gradient_alignment", "hessian", "hutch_plus_plus", "hutchinson", "sgd_train_step", "slq_density",
           "TrainingJacobian", "training_jacobian"]
