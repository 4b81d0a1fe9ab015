"""Diagnostics on weight spectra: per-matrix metrics and the table that holds them."""

from .compare import compare, compare_matrices, intruder_dimensions, principal_angles
from .metrics import condition_number, effective_rank, frobenius_norm, spectral_entropy, stable_rank
from .run import analyze, analyze_record
from .table import SpectrumTable

__all__ = [
    "SpectrumTable",
    "analyze",
    "compare",
    "compare_matrices",
    "intruder_dimensions",
    "principal_angles",
    "analyze_record",
    "condition_number",
    "effective_rank",
    "frobenius_norm",
    "spectral_entropy",
    "stable_rank",
]
