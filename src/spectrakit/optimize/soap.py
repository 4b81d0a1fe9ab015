r"""SOAP: Adam run in the eigenbasis of Shampoo's two Kronecker factors.

For a weight matrix ``W`` (``m × n``) with gradient ``G_t`` (Vyas et al., 2024):

    L_t = β_s·L_{t−1} + (1 − β_s)·G_t G_tᵀ,   R_t = β_s·R_{t−1} + (1 − β_s)·G_tᵀ G_t
    Q_L, Q_R = eigenvectors of L_t, R_t      (refreshed every ``precondition_frequency`` steps)
    M_t = β₁·M_{t−1} + (1 − β₁)·G_t          (first moment, in the original coordinates)
    G′ = Q_Lᵀ G_t Q_R,   M′ = Q_Lᵀ M_t Q_R    (rotated into the eigenbasis)
    V_t = β₂·V_{t−1} + (1 − β₂)·G′ ⊙ G′       (second moment, in the eigenbasis)
    N = Q_L [ (M′ / (1 − β₁ᵗ)) / (√(V_t / (1 − β₂ᵗ)) + ε) ] Q_Rᵀ
    W_t = (1 − ηλ)·W_{t−1} − η·N

``β_s`` (``shampoo_beta``) defaults to ``β₂``. A side longer than
``max_preconditioner_dim`` keeps the identity as its basis. The eigendecompositions
(the core's :func:`spectrakit.linalg.gram_spectrum`) are spread over the ranks under DDP.
Unlike the reference code, the factors include the current gradient before the first
basis is formed, so the first step is already a rotated Adam step rather than skipped;
and the basis is recomputed by ``eigh`` rather than refined by one QR power step.

>>> import torch, spectrakit as sk
>>> layer = torch.nn.Linear(16, 8, bias=False)
>>> opt = sk.optimize.SOAP(layer.parameters(), lr=3e-3)
>>> layer(torch.randn(4, 16)).square().sum().backward()
>>> opt.step()
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ._base import MatrixOptimizer, as_matrix_view, check_count, check_fraction
from ._distributed import spread
from ._factors import accumulate, eigh, new_factors


def rotate(X: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor:
    """``Q_Lᵀ X Q_R`` (a missing side is the identity)."""
    if left is not None:
        X = left.mT @ X
    return X @ right if right is not None else X


def rotate_back(X: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor:
    """``Q_L X Q_Rᵀ`` (a missing side is the identity)."""
    if left is not None:
        X = left @ X
    return X @ right.mT if right is not None else X


class SOAP(MatrixOptimizer):
    """Adam in Shampoo's eigenbasis (see the module docstring for the formula).

    Args:
        params: matrices (conv kernels allowed), named parameters or param groups.
        lr: learning rate ``η``.
        betas: ``(β₁, β₂)`` of Adam's moments.
        shampoo_beta: ``β_s`` of the factors (default ``β₂``).
        eps: Adam's ``ε``.
        weight_decay: decoupled weight decay ``λ``.
        precondition_frequency: steps between eigenbasis refreshes (1 = every step).
        max_preconditioner_dim: sides longer than this keep the identity.
        eigh_dtype: dtype of the eigendecompositions.
        distributed, process_group, check_finite: see :class:`._base.MatrixOptimizer`.
    """

    def __init__(self, params: Iterable[Any], lr: float = 3e-3, betas: tuple[float, float] = (0.95, 0.95),
                 shampoo_beta: float | None = None, eps: float = 1e-8, weight_decay: float = 0.0,
                 precondition_frequency: int = 10, max_preconditioner_dim: int = 10000,
                 eigh_dtype: torch.dtype = torch.float32, *, distributed: bool = True,
                 process_group: object | None = None, check_finite: bool = True) -> None:
        defaults = {"lr": lr, "betas": betas, "shampoo_beta": shampoo_beta, "eps": eps,
                    "weight_decay": weight_decay, "precondition_frequency": precondition_frequency,
                    "max_preconditioner_dim": max_preconditioner_dim, "eigh_dtype": eigh_dtype}
        super().__init__(params, defaults, distributed=distributed, process_group=process_group,
                         check_finite=check_finite)

    def check_group(self, group: dict[str, Any]) -> None:
        """Refuse bad SOAP options in ``group`` with one line.

        Args:
            group: a param group.
        """
        if group.get("adamw"):
            return
        for beta in group["betas"]:
            check_fraction("betas", beta, "SOAP")
        if group["shampoo_beta"] is not None:
            check_fraction("shampoo_beta", group["shampoo_beta"], "SOAP")
        check_count("precondition_frequency", group["precondition_frequency"], "SOAP")
        check_count("max_preconditioner_dim", group["max_preconditioner_dim"], "SOAP")

    def matrix_step(self, groups: list[dict[str, Any]]) -> None:
        """Factors, eigenbases (spread over ranks), Adam in the eigenbasis, the update.

        Args:
            groups: the matrix param groups.
        """
        for group in groups:
            beta1, beta2 = group["betas"]
            beta_s = beta2 if group["shampoo_beta"] is None else group["shampoo_beta"]
            work = []
            for _, param, grad in self.named_grads(group):
                G = as_matrix_view(grad)
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(G)
                    state["exp_avg_sq"] = torch.zeros_like(G)
                    state["left"], state["right"] = new_factors(G, group["max_preconditioner_dim"])
                    state["left_basis"], state["right_basis"] = None, None
                state["step"] += 1
                accumulate(state["left"], G @ G.mT if state["left"] is not None else None, beta_s)
                accumulate(state["right"], G.mT @ G if state["right"] is not None else None, beta_s)
                work.append((param, G, state))
            self._refresh_bases(group, [state for _, _, state in work])
            for param, G, state in work:
                left, right = state["left_basis"], state["right_basis"]
                state["exp_avg"].lerp_(G, 1 - beta1)
                rotated = rotate(G, left, right)
                state["exp_avg_sq"].mul_(beta2).addcmul_(rotated, rotated, value=1 - beta2)
                step = state["step"]
                moment = rotate(state["exp_avg"], left, right) / (1 - beta1 ** step)
                scale = (state["exp_avg_sq"] / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
                direction = rotate_back(moment / scale, left, right)
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(direction.view_as(param), alpha=-group["lr"])

    def _refresh_bases(self, group: dict[str, Any], states: list[dict[str, Any]]) -> None:
        due = [s for s in states if (s["step"] - 1) % group["precondition_frequency"] == 0]
        factors = [(s, side) for s in due for side in ("left", "right") if s[side] is not None]
        bases = spread([s[side] for s, side in factors], lambda _, F: eigh(F, group["eigh_dtype"])[1],
                       [s[side].shape[0] ** 3 for s, side in factors],
                       process_group=self.process_group, enabled=self.distributed)
        for (s, side), basis in zip(factors, bases):
            s[f"{side}_basis"] = basis.to(s[side].dtype)
