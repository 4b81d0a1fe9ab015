r"""Muon: momentum, then the update orthogonalized by Newton–Schulz.

For a weight matrix ``W`` (``A × B``; a conv kernel as ``out × (in·k…)``) with gradient
``G_t``, momentum ``μ`` and learning rate ``η``:

    B_t = μ·B_{t−1} + (1 − μ)·G_t                       (momentum, an EMA)
    M_t = (1 − μ)·G_t + μ·B_t   if nesterov, else B_t
    O_t = NS₅(M_t / ‖M_t‖_F)                            (quintic Newton–Schulz)
    W_t = (1 − η·λ)·W_{t−1} − η·s(A, B)·O_t

``NS`` is :func:`spectrakit.linalg.orthogonalize` with ``coefficients="muon"``
(``X ← aX + X(bXᵀX + c(XᵀX)²)``, ``(a, b, c) = (3.4445, −4.7750, 2.0315)``): it maps
every singular value of ``M_t`` into a band around 1 (about ``[0.68, 1.13]`` after five
steps) while keeping its singular vectors, so ``O_t ≈ U Vᵀ``. The learning-rate scale
``s`` is ``adjust_lr="original"``: ``√max(1, A/B)``, ``"match_rms_adamw"``:
``0.2·√max(A, B)`` (the update's RMS then matches AdamW's), ``None``: 1. ``λ`` is
decoupled weight decay. This is the update of ``torch.optim.Muon`` (whose
``adjust_lr_fn=None`` means ``"original"``); ``ns_dtype=torch.bfloat16`` iterates in bf16
as it does, the default iterates in float32.

Muon is for hidden weight matrices only; :func:`spectrakit.optimize.for_model` gives
embeddings, the output head, norms and biases to AdamW in the same optimizer object.

>>> import torch, spectrakit as sk
>>> layer = torch.nn.Linear(16, 8, bias=False)
>>> opt = sk.optimize.Muon(layer.parameters(), lr=0.02)
>>> layer(torch.randn(4, 16)).square().sum().backward()
>>> opt.step()
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial
from typing import Any

import torch

from ..errors import SpectrakitError
from ..linalg import orthogonalize
from ._base import MatrixOptimizer, as_matrix_view, check_count, check_fraction
from ._distributed import spread

ADJUST_LR = ("original", "match_rms_adamw", None)


def lr_scale(adjust_lr: str | None, rows: int, columns: int) -> float:
    """The factor ``s(A, B)`` Muon multiplies the learning rate by for an ``A × B`` matrix."""
    if adjust_lr == "original":
        return math.sqrt(max(1.0, rows / columns))
    if adjust_lr == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, columns))
    return 1.0


def _newton_schulz(_: int, M: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
    return orthogonalize(M, group["ns_steps"], "muon", dtype=group["ns_dtype"], scale="frobenius", eps=group["eps"],
                         check_finite=False)  # the step checked every gradient at once


class Muon(MatrixOptimizer):
    """Momentum orthogonalized by Newton–Schulz (see the module docstring for the formula).

    Args:
        params: matrices (conv kernels allowed), named parameters or param groups; a group
            may set ``transposed=True`` for weights stored ``in × out`` (transformers'
            ``Conv1D``) so that ``adjust_lr`` sees ``out × in``, and ``adamw=True`` to be
            stepped by AdamW instead (what :func:`~spectrakit.optimize.for_model` does).
        lr: learning rate ``η`` (≥ 0).
        momentum: ``μ`` in ``[0, 1)``.
        nesterov: use the Nesterov form ``(1 − μ)·G + μ·B``.
        ns_steps: Newton–Schulz iterations.
        weight_decay: decoupled weight decay ``λ`` (applied as ``W ← (1 − ηλ) W``).
        adjust_lr: ``"original"``, ``"match_rms_adamw"`` or ``None`` (see above).
        ns_dtype: dtype of the iteration (default float32; ``torch.bfloat16`` as torch does).
        eps: floor of ``‖M‖_F``.
        distributed, process_group, check_finite: see :class:`._base.MatrixOptimizer`.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0, adjust_lr: str | None = "original",
                 ns_dtype: torch.dtype | None = None, eps: float = 1e-7, *, distributed: bool = True,
                 process_group: object | None = None, check_finite: bool = True) -> None:
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "ns_steps": ns_steps,
                    "weight_decay": weight_decay, "adjust_lr": adjust_lr, "ns_dtype": ns_dtype, "eps": eps}
        super().__init__(params, defaults, distributed=distributed, process_group=process_group,
                         check_finite=check_finite)

    def check_group(self, group: dict[str, Any]) -> None:
        """Refuse bad Muon options in ``group`` with one line.

        Args:
            group: a param group.
        """
        if group.get("adamw"):
            return
        check_fraction("momentum", group["momentum"], "Muon")
        check_count("ns_steps", group["ns_steps"], "Muon", minimum=0)
        if group["adjust_lr"] not in ADJUST_LR:
            raise SpectrakitError(f"Muon: adjust_lr={group['adjust_lr']!r} is not one of original, "
                                  "match_rms_adamw, None")
        dtype = group["ns_dtype"]
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise SpectrakitError(f"Muon: ns_dtype={dtype!r} is not a floating-point torch.dtype")

    def matrix_step(self, groups: list[dict[str, Any]]) -> None:
        """Momentum, orthogonalization (spread over ranks) and the update of ``groups``.

        Args:
            groups: the matrix param groups.
        """
        for group in groups:
            params, updates = [], []
            momentum = group["momentum"]
            for _, param, grad in self.named_grads(group):
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                buffer = state["momentum_buffer"]
                buffer.lerp_(grad, 1 - momentum)
                update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                params.append(param)
                updates.append(as_matrix_view(update))
            orthogonal = spread(updates, partial(_newton_schulz, group=group),
                                [max(M.shape) * min(M.shape) ** 2 for M in updates],
                                process_group=self.process_group, enabled=self.distributed)
            for param, update in zip(params, orthogonal):
                rows, columns = update.shape
                if group.get("transposed"):
                    rows, columns = columns, rows
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(update.view_as(param), alpha=-group["lr"] * lr_scale(group["adjust_lr"], rows, columns))
