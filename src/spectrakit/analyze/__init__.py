"""Diagnostics on weight spectra: per-matrix metrics and the table that holds them."""

from .compare import compare, compare_matrices, intruder_dimensions, principal_angles
from .curvature import Curvature, gradient_alignment, hessian, sgd_train_step, training_jacobian
from .detuning import detune, spectral_detuning
from .feature_learning import spectral_condition
from .features import analyze_features, feature_spectrum
from .lipschitz import layer_norms, lipschitz, product_bound
from .metrics import condition_number, effective_rank, frobenius_norm, spectral_entropy, stable_rank
from .monitor import SpectralMonitor
from .nuclear_norm import matrix_nuclear_norm, response_nuclear_norm
from .run import analyze, analyze_record
from .table import SpectrumTable

__all__ = [
    "Curvature",
    "gradient_alignment",
    "hessian",
    "sgd_train_step",
    "training_jacobian",
    "detune",
    "spectral_detuning",
    "spectral_condition",
    "matrix_nuclear_norm",
    "response_nuclear_norm",
    "SpectralMonitor",
    "SpectrumTable",
    "analyze",
    "analyze_features",
    "compare",
    "feature_spectrum",
    "compare_matrices",
    "intruder_dimensions",
    "layer_norms",
    "lipschitz",
    "product_bound",
    "principal_angles",
    "analyze_record",
    "condition_number",
    "effective_rank",
    "frobenius_norm",
    "spectral_entropy",
    "stable_rank",
]

# `spectrakit.analyze` is bound to the function analyze (see spectrakit/__init__); the curvature
# entry points hang from it too, so that `spectrakit.analyze.hessian(...)` reads as documented
for _name in ("hessian", "gradient_alignment", "training_jacobian", "sgd_train_step", "spectral_condition",
              "spectral_detuning", "matrix_nuclear_norm"):
    setattr(analyze, _name, globals()[_name])
