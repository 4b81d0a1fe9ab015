"""The spectral core: every spectrum in spectrakit is computed here.

>>> import torch, spectrakit as sk
>>> W = torch.randn(256, 128)
>>> S = sk.linalg.svdvals(W)                    # full spectrum, descending
>>> U, S5, Vh = sk.linalg.svd(W, k=5)           # top-5 triplets
>>> sigma = sk.linalg.spectral_norm(W, "gram")  # certified upper bound on σ₁
"""

from .conv import conv_frequency_matrices, conv_singular_values
from .gram import gram, gram_eigh, gram_spectrum, other_vectors
from .incremental import IncrementalSVD, svd_update
from .norms import PowerIteration, gram_iteration_bound, spectral_norm
from .polar import orthogonalize
from .svd import METHODS, choose_method, svd, svdvals

__all__ = [
    "METHODS",
    "IncrementalSVD",
    "PowerIteration",
    "choose_method",
    "conv_frequency_matrices",
    "conv_singular_values",
    "gram",
    "gram_eigh",
    "gram_spectrum",
    "gram_iteration_bound",
    "orthogonalize",
    "other_vectors",
    "spectral_norm",
    "svd",
    "svd_update",
    "svdvals",
]
