"""Importing this module registers every adapter method."""

from . import asymmetric, eva, fourierft, hra, lora, milora, pissa, salt, soma, sorsa, spectral, svfit, svft  # noqa: F401
