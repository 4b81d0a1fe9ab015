"""One weight matrix, described cheaply and loaded on demand.

A :class:`MatrixRecord` is what every source (a module, a checkpoint file, a
state dict) turns into. It carries the name, kind, shape and dtype, which are
known without touching tensor data, and a private loader that reads the tensor
only when :meth:`MatrixRecord.load` is called. Consumers can therefore filter,
sort and plan over thousands of records while holding one tensor at a time.

Shapes are canonical, whatever the storage layout:

* linear, embedding and plain matrices are ``(out, in)`` — Hugging Face's
  GPT-2 style ``Conv1D`` (stored ``(in, out)``) is reported transposed;
* conv kernels are ``(out, in / groups, *kernel)``; :meth:`MatrixRecord.matrix`
  flattens them to ``(out, in / groups · ∏ kernel)``.

Example::

    >>> import torch
    >>> from spectrakit.weights import iter_matrices
    >>> layer = torch.nn.Linear(4, 3)
    >>> (record,) = iter_matrices(layer)
    >>> record.name, record.kind, record.shape
    ('weight', 'linear', (3, 4))
    >>> record.matrix().shape
    torch.Size([3, 4])
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from spectrakit.errors import SpectrakitError

#: Every kind a record can have, in the order a report would list them.
#: ``recurrent`` is one gate of an LSTM/GRU weight, or an RNN weight (see :mod:`~spectrakit.weights.recurrent`).
KINDS: tuple[str, ...] = ("linear", "conv1d", "conv2d", "recurrent", "embedding", "matrix")

_CONV_KINDS = ("conv1d", "conv2d")


@dataclass(frozen=True)
class MatrixRecord:
    """A weight matrix (or conv kernel) and a way to load it.

    Attributes:
        name: parameter name, e.g. ``"transformer.h.0.attn.c_attn.weight"``.
        kind: one of :data:`KINDS`.
        shape: canonical shape — ``(out, in)`` for matrices,
            ``(out, in / groups, *kernel)`` for conv kernels.
        dtype: dtype of the stored tensor (no conversion happens on load).
        source: the file the tensor lives in, ``"module"`` or ``"state_dict"``.
        aliases: other names of the same (tied) tensor, e.g. ``("lm_head.weight",)``.

    Example::

        >>> import torch
        >>> record = MatrixRecord(
        ...     name="w", kind="matrix", shape=(2, 3), dtype=torch.float32,
        ...     source="demo", _loader=lambda: torch.zeros(2, 3))
        >>> record.numel, record.load().shape
        (6, torch.Size([2, 3]))
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    source: str
    aliases: tuple[str, ...] = ()
    # Returns the tensor as stored; ``_transposed`` says whether storage is
    # (in, out) so that ``load`` can present the canonical (out, in).
    _loader: Callable[[], torch.Tensor] | None = field(
        default=None, repr=False, compare=False, kw_only=True
    )
    _transposed: bool = field(default=False, repr=False, compare=False, kw_only=True)
    _meta: bool = field(default=False, repr=False, compare=False, kw_only=True)

    @property
    def numel(self) -> int:
        """Number of elements, computed from the shape (nothing is loaded)."""
        return math.prod(self.shape)

    @property
    def is_meta(self) -> bool:
        """True for a tensor on the ``meta`` device: shape only, no values."""
        return self._meta

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """The ``(rows, cols)`` of :meth:`matrix`, without loading anything."""
        return _matrix_shape(self.kind, self.shape)

    def load(self) -> torch.Tensor:
        """Read the tensor, detached, on its original device, in canonical shape.

        A transposed layout comes back as a transposed view, not a copy; the
        tensor may share memory with the model it came from, so don't modify
        it in place.

        Raises:
            SpectrakitError: the tensor cannot be read, naming tensor and source.
        """
        if self._loader is None:
            raise SpectrakitError(f"{self.source}: tensor {self.name!r} has no loader")
        try:
            tensor = self._loader()
        except SpectrakitError:
            raise
        except Exception as error:  # any reader failure is a user-facing load error
            raise SpectrakitError(
                f"{self.source}: tensor {self.name!r} failed to load ({one_line(error)})"
            ) from error
        tensor = tensor.detach()
        if self._transposed:
            tensor = tensor.t()
        if tuple(tensor.shape) != self.shape:
            # The file changed after its header was read, or a parametrization
            # changed shape: the record would describe the wrong matrix.
            raise SpectrakitError(
                f"{self.source}: tensor {self.name!r} has shape {tuple(tensor.shape)}, "
                f"expected {self.shape}"
            )
        return tensor

    def matrix(self) -> torch.Tensor:
        """Load the tensor as a 2-D matrix of shape :attr:`matrix_shape`.

        Conv kernels ``(out, in, *k)`` become ``(out, in·∏k)``: each row is one
        output filter. A higher-dimensional plain parameter first drops leading
        unit dimensions (``(1, tokens, dim)`` → ``(tokens, dim)``), then
        flattens the same way.
        """
        return self.load().reshape(self.matrix_shape)


def _matrix_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 2:
        return (shape[0], shape[1])
    if kind not in _CONV_KINDS:
        # Leading unit axes (batch-like, e.g. a ViT position table of shape
        # (1, 197, 768)) carry no structure; rows should be the first real axis.
        while len(shape) > 2 and shape[0] == 1:
            shape = shape[1:]
        if len(shape) == 2:
            return (shape[0], shape[1])
    return (shape[0], math.prod(shape[1:]))


# -- naming helpers shared by every source -----------------------------------

_WILDCARDS = re.compile(r"[*?\[]")


def matches_any(names: Iterable[str], patterns: Iterable[str]) -> bool:
    """True when any name matches any pattern.

    A pattern with wildcard characters (``*?[``) is an ``fnmatch`` pattern over
    the whole name; a pattern without them matches as a substring.

    Example::

        >>> matches_any(["model.layers.0.mlp.up_proj.weight"], ["mlp"])
        True
        >>> matches_any(["model.layers.0.mlp.up_proj.weight"], ["*.q_proj.weight"])
        False
    """
    names = list(names)
    for pattern in patterns:
        if _WILDCARDS.search(pattern):
            if any(fnmatch.fnmatchcase(name, pattern) for name in names):
                return True
        elif any(pattern in name for name in names):
            return True
    return False


def natural_key(name: str) -> list[int | str]:
    """Sort key that orders digit runs by value: ``layers.9`` before ``layers.10``.

    ``re.split`` with a capturing group alternates text and digits, starting
    with text, so keys compare str with str and int with int position by position.

    Example::

        >>> sorted(["h.10.w", "h.9.w", "h.1.w"], key=natural_key)
        ['h.1.w', 'h.9.w', 'h.10.w']
    """
    parts = re.split(r"(\d+)", name)
    return [int(part) if index % 2 else part for index, part in enumerate(parts)]


def one_line(error: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an error message, shortened, for a one-line report."""
    for line in str(error).splitlines():
        line = line.strip()
        if line:
            return line if len(line) <= limit else line[: limit - 1] + "…"
    return type(error).__name__
