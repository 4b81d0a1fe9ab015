"""Where matrices come from: modules, checkpoint files, folders and state dicts.

Every source becomes a stream of :class:`MatrixRecord` — name, kind, canonical
shape, dtype and a lazy ``load()`` — so that the rest of spectrakit never opens
files or walks modules itself.

Example::

    >>> import torch
    >>> import spectrakit.weights as sw
    >>> model = torch.nn.Sequential(torch.nn.Embedding(100, 8), torch.nn.Linear(8, 8))
    >>> [(r.name, r.kind, r.shape) for r in sw.iter_matrices(model)]
    [('0.weight', 'embedding', (100, 8)), ('1.weight', 'linear', (8, 8))]
"""

from spectrakit.weights.record import KINDS, MatrixRecord
from spectrakit.weights.source import iter_matrices

__all__ = ["KINDS", "MatrixRecord", "iter_matrices"]
