"""spectrakit — the singular spectrum of neural networks.

>>> import spectrakit as sk
>>> table = sk.analyze(sk.reference.reference_weights_path())   # doctest: +SKIP
>>> print(table.summary())                                       # doctest: +SKIP

``import spectrakit`` needs only torch, numpy and safetensors; the data, reference-model
and command-line modules load on first use, and Hugging Face support and reports are
optional extras.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import linalg, regularize, weights
from .adapt import (  # the functions, not the folder
    adapt,
    adapter_penalty,
    load_adapter,
    merge,
    merge_adapters,
    save_adapter,
    trainable_parameters,
)
from .adapt import init_from_checkpoint as adapt_checkpoint  # sk.adapt is the function
from .analyze import (  # binds the name `analyze` to the function, not the folder
    SpectralMonitor,
    SpectrumTable,
    analyze,
    analyze_features,
    compare,
    lipschitz,
)
from .cache import SpectrumCache
from .compress import compress, load_compressed, save_compressed  # the function `compress`, not the folder
from .errors import SpectrakitError
from .weights import iter_matrices

__version__ = "0.1.0"

# Loaded on first use: they pull in optional dependencies or data.
_SUBMODULES = ("data", "reference", "cli", "optimize")
_EXPORTS = {"reference_model": ("spectrakit.reference", "reference_model")}

__all__ = ["SpectrakitError", "SpectralMonitor", "SpectrumTable", "__version__", "analyze", "analyze_features",
           "compare", "lipschitz", "iter_matrices", "linalg", "weights", "adapt", "adapter_penalty",
           "adapt_checkpoint", "load_adapter",
           "merge", "merge_adapters", "save_adapter", "trainable_parameters", "compress", "load_compressed",
           "save_compressed", "regularize", "SpectrumCache", *_SUBMODULES, *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attribute = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attribute)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"spectrakit.{name}")
    else:
        raise AttributeError(f"module 'spectrakit' has no attribute {name!r}")
    return value
