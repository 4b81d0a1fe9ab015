"""Optimize: train through the spectrum (the fifth verb).

Each optimizer is a ``torch.optim.Optimizer`` (param groups, ``state_dict``,
``zero_grad``, ``torch.amp.GradScaler``, LR schedulers), one file each, with its formula
in the docstring. :func:`for_model` builds one optimizer object for a whole model: the
hidden weight matrices to the spectral method, embeddings, the output head, norms and
biases to AdamW.

>>> import torch, spectrakit as sk
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
>>> opt = sk.optimize.for_model(model, "muon", lr=0.02)
>>> model(torch.randn(2, 8)).sum().backward()
>>> opt.step()
"""

from ._base import MatrixOptimizer
from ._projection import dct_basis
from .galore import GaLore
from .grokfast import Grokfast
from .multinorm import MultiNormalized, sinkhorn_normalize
from .muon import Muon
from .routing import METHODS, AdamWOnly, Route, for_model
from .sam import SAM
from .shampoo import Shampoo
from .soap import SOAP

__all__ = ["METHODS", "SAM", "SOAP", "AdamWOnly", "GaLore", "Grokfast", "MatrixOptimizer", "MultiNormalized", "Muon",
           "Route", "Shampoo", "dct_basis", "for_model", "sinkhorn_normalize"]
