"""Jacobian regularization: the input–output Jacobian's Frobenius norm, by random projections.

For a model ``z = f(x)`` with ``C`` outputs per sample, ``‖J‖²_F = C · E_v ‖vᵀJ‖²`` for ``v``
uniform on the unit sphere of the output space, and each ``vᵀJ`` is one backward pass
(Hoffman, Roberts & Yaida, *Robust Learning with Jacobian Regularization*, 2019). The
penalty is the batch mean of

    ‖J(x)‖²_F ≈ C/n_proj · Σ_{p=1..n_proj} ‖v_pᵀ J(x)‖²

— unbiased for any ``n_proj`` (one is the paper's choice), or exact with ``exact=True``
(``C`` backward passes). A small ``‖J‖_F`` makes the output insensitive to input
perturbations (robustness, flatter decision boundaries). It is differentiable with
respect to the model's parameters (the backward passes build a graph).

>>> import torch, spectrakit as sk
>>> layer = torch.nn.Linear(5, 3)
>>> x = torch.randn(8, 5, requires_grad=True)
>>> exact = sk.regularize.JacobianPenalty(exact=True)(x, layer(x))
>>> bool(torch.isclose(exact, layer.weight.square().sum()))   # J = W for a linear map
True
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SpectrakitError


class JacobianPenalty(nn.Module):
    """Batch-mean ``‖∂outputs/∂inputs‖²_F``; call ``penalty(inputs, outputs)``.

    Args:
        n_projections: random projections per call (each costs one backward pass).
        exact: use the ``C`` unit vectors instead of random ones.
        seed: seeds the projections' generator (``None``: torch's global generator).
    """

    def __init__(self, n_projections: int = 1, exact: bool = False, seed: int | None = None) -> None:
        super().__init__()
        if not isinstance(n_projections, int) or n_projections < 1:
            raise SpectrakitError(f"n_projections={n_projections!r} must be a positive integer")
        self.n_projections, self.exact = n_projections, exact
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def projections(self, flat: torch.Tensor) -> torch.Tensor:
        """``(n, B, C)`` output-space directions: unit vectors, or random ones scaled by √C."""
        batch, classes = flat.shape
        if self.exact:
            eye = torch.eye(classes, dtype=flat.dtype, device=flat.device)
            return eye[:, None, :].expand(classes, batch, classes)
        v = torch.randn(self.n_projections, batch, classes, generator=self.generator, dtype=flat.dtype)
        v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)
        # E‖vᵀJ‖² = ‖J‖²_F / C on the unit sphere: scale by √C (and average over projections)
        return (v * (classes / self.n_projections) ** 0.5).to(flat.device)

    def forward(self, inputs: torch.Tensor, outputs: torch.Tensor,
                projections: torch.Tensor | None = None) -> torch.Tensor:
        """``projections`` (``(n, B, C)``, already scaled: ``‖J‖²_F ≈ Σ_p ‖v_pᵀJ‖²``) replaces the draw."""
        if not isinstance(inputs, torch.Tensor) or not inputs.requires_grad:
            raise SpectrakitError("JacobianPenalty: inputs must require grad; call inputs.requires_grad_() "
                                  "before the forward pass")
        if not isinstance(outputs, torch.Tensor) or outputs.ndim < 1 or outputs.shape[0] != inputs.shape[0]:
            raise SpectrakitError("JacobianPenalty: outputs must be a tensor with the inputs' batch size first")
        if not outputs.requires_grad:
            raise SpectrakitError("JacobianPenalty: outputs do not depend on the inputs (no graph)")
        flat = outputs.reshape(outputs.shape[0], -1)
        directions = self.projections(flat) if projections is None else projections.to(flat)
        total = outputs.new_zeros(())
        for v in directions:
            (grad,) = torch.autograd.grad(flat, inputs, grad_outputs=v, create_graph=True, retain_graph=True,
                                          allow_unused=True)
            if grad is None:
                raise SpectrakitError("JacobianPenalty: outputs do not depend on the inputs")
            total = total + grad.square().sum()
        if not bool(torch.isfinite(total.detach())):
            raise SpectrakitError("JacobianPenalty: the Jacobian norm is not finite (NaN in inputs or weights?)")
        return total / outputs.shape[0]
