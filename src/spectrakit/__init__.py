"""spectrakit — the singular spectrum of neural networks.

>>> import spectrakit as sk
>>> table = sk.analyze(sk.reference.reference_weights_path())   # doctest: +SKIP
>>> print(table.summary())                                       # doctest: +SKIP

Submodules load on first use, so ``import spectrakit`` needs only torch, numpy and
safetensors; Hugging Face support and reports are optional extras.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import SpectrakitError

__version__ = "0.1.0"

_SUBMODULES = ("linalg", "weights", "analyze", "data", "reference", "cli")
# public name -> (submodule, attribute)
_EXPORTS = {
    "analyze": ("spectrakit.analyze", "analyze"),
    "SpectrumTable": ("spectrakit.analyze", "SpectrumTable"),
    "iter_matrices": ("spectrakit.weights", "iter_matrices"),
    "reference_model": ("spectrakit.reference", "reference_model"),
}

__all__ = ["SpectrakitError", "__version__", *_SUBMODULES, *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attribute = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attribute)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"spectrakit.{name}")
    else:
        raise AttributeError(f"module 'spectrakit' has no attribute {name!r}")
    return value
