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
from .incremental_sparse import SparseIncrementalSVD
from .norms import PowerIteration, gram_iteration_bound, spectral_norm
from .polar import orthogonalize
from .projections import project_ky_fan_ball, project_nuclear_ball, project_psd, project_rank, project_spectral_ball
from .smallest import SmallestSingularValue, resolution_floor, smallest_singular_value
from .sqrtm import inv_sqrtm, sqrtm
from .svd import METHODS, choose_method, svd, svdvals

__all__ = [
    "METHODS",
    "IncrementalSVD",
    "PowerIteration",
    "SparseIncrementalSVD",
    "SmallestSingularValue",
    "choose_method",
    "conv_frequency_matrices",
    "conv_singular_values",
    "gram",
    "gram_eigh",
    "gram_spectrum",
    "gram_iteration_bound",
    "inv_sqrtm",
    "orthogonalize",
    "other_vectors",
    "project_ky_fan_ball",
    "project_nuclear_ball",
    "project_psd",
    "project_rank",
    "project_spectral_ball",
    "resolution_floor",
    "smallest_singular_value",
    "spectral_norm",
    "sqrtm",
    "svd",
    "svd_update",
    "svdvals",
]
