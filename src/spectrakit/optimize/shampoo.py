r"""Shampoo: the gradient preconditioned by inverse fourth roots of its Kronecker factors.

For a weight matrix ``W`` (``m × n``) with gradient ``G_t`` (Gupta et al., 2018):

    L_t = L_{t−1} + G_t G_tᵀ,   R_t = R_{t−1} + G_tᵀ G_t          (running sums)
    P_L = (L_t + εI)^{−1/4},   P_R = (R_t + εI)^{−1/4}   (refreshed every ``precondition_frequency`` steps)
    M_t = β₁·M_{t−1} + (1 − β₁)·G_t,   M̂ = M_t / (1 − β₁ᵗ)   (β₁ = 0: M̂ = G_t)
    D = P_L M̂ P_R
    graft="adam":  D ← D·‖A‖_F / ‖D‖_F,  A = M̂ / (√(V_t/(1 − β₂ᵗ)) + ε_a),  V_t = β₂V_{t−1} + (1 − β₂)G_t²
    graft="sgd":   D ← D·‖M̂‖_F / ‖D‖_F
    W_t = (1 − ηλ)·W_{t−1} − η·D

With β_f < 1 the factors are EMAs ``β_f·L + (1 − β_f)·GGᵀ``. The roots come from the
core's eigensolver (:func:`spectrakit.linalg.gram_spectrum`, float64 by default):
``(L + εI)^{−1/4} = Q diag((λ + ε)^{−1/4}) Qᵀ``; under DDP the ranks share them. Grafting
takes the step *size* from a simpler optimizer and only the *direction* from Shampoo.
A side longer than ``max_preconditioner_dim`` is left unpreconditioned (``P = I``).

>>> import torch, spectrakit as sk
>>> layer = torch.nn.Linear(16, 8, bias=False)
>>> opt = sk.optimize.Shampoo(layer.parameters(), lr=1e-3)
>>> layer(torch.randn(4, 16)).square().sum().backward()
>>> opt.step()
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..errors import SpectrakitError
from ._base import MatrixOptimizer, as_matrix_view, check_count, check_fraction, check_nonnegative
from ._distributed import spread
from ._factors import accumulate, eigh, new_factors

GRAFTS = ("adam", "sgd", None)


def inverse_root(factor: torch.Tensor, epsilon: float, dtype: torch.dtype, power: int = 4) -> torch.Tensor:
    """``(factor + εI)^{−1/power}`` of a symmetric positive semi-definite ``factor``."""
    eigenvalues, vectors = eigh(factor, dtype)
    return (vectors * (eigenvalues + epsilon).pow(-1.0 / power)) @ vectors.mT


class Shampoo(MatrixOptimizer):
    """Kronecker-factored preconditioning with grafting (see the module docstring).

    Args:
        params: matrices (conv kernels allowed), named parameters or param groups.
        lr: learning rate ``η``.
        betas: ``(β₁, β₂)``: momentum of the gradient, and the Adam graft's second moment.
        epsilon: ``ε`` added to the factors' eigenvalues before the root.
        precondition_frequency: steps between root refreshes.
        graft: ``"adam"``, ``"sgd"`` or ``None`` (the raw Shampoo step).
        max_preconditioner_dim: sides longer than this are left unpreconditioned.
        factor_beta: ``β_f`` (1 = running sums as in the paper, < 1 = EMAs).
        graft_eps: ``ε_a`` of the Adam graft.
        weight_decay: decoupled weight decay ``λ``.
        root_dtype: dtype of the eigendecompositions.
        distributed, process_group, check_finite: see :class:`._base.MatrixOptimizer`.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 epsilon: float = 1e-8, precondition_frequency: int = 10, graft: str | None = "adam",
                 max_preconditioner_dim: int = 4096, factor_beta: float = 1.0, graft_eps: float = 1e-8,
                 weight_decay: float = 0.0, root_dtype: torch.dtype = torch.float64, *, distributed: bool = True,
                 process_group: object | None = None, check_finite: bool = True) -> None:
        defaults = {"lr": lr, "betas": betas, "epsilon": epsilon, "precondition_frequency": precondition_frequency,
                    "graft": graft, "max_preconditioner_dim": max_preconditioner_dim, "factor_beta": factor_beta,
                    "graft_eps": graft_eps, "weight_decay": weight_decay, "root_dtype": root_dtype}
        super().__init__(params, defaults, distributed=distributed, process_group=process_group,
                         check_finite=check_finite)

    def check_group(self, group: dict[str, Any]) -> None:
        """Refuse bad Shampoo options in ``group`` with one line.

        Args:
            group: a param group.
        """
        if group.get("adamw"):
            return
        for beta in group["betas"]:
            check_fraction("betas", beta, "Shampoo")
        check_nonnegative("epsilon", group["epsilon"], "Shampoo")
        check_count("precondition_frequency", group["precondition_frequency"], "Shampoo")
        check_count("max_preconditioner_dim", group["max_preconditioner_dim"], "Shampoo")
        if group["graft"] not in GRAFTS:
            raise SpectrakitError(f"Shampoo: graft={group['graft']!r} is not one of adam, sgd, None")
        beta = group["factor_beta"]
        if not isinstance(beta, (int, float)) or not 0 < beta <= 1:
            raise SpectrakitError(f"Shampoo: factor_beta={beta!r} must lie in (0, 1]")

    def matrix_step(self, groups: list[dict[str, Any]]) -> None:
        """Factors, roots (spread over ranks), preconditioned and grafted update.

        Args:
            groups: the matrix param groups.
        """
        for group in groups:
            beta1, beta2 = group["betas"]
            work = []
            for _, param, grad in self.named_grads(group):
                G = as_matrix_view(grad)
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["left"], state["right"] = new_factors(G, group["max_preconditioner_dim"])
                    state["left_root"], state["right_root"] = None, None
                    if beta1 > 0:
                        state["exp_avg"] = torch.zeros_like(G)
                    if group["graft"] == "adam":
                        state["exp_avg_sq"] = torch.zeros_like(G)
                state["step"] += 1
                accumulate(state["left"], G @ G.mT if state["left"] is not None else None, group["factor_beta"])
                accumulate(state["right"], G.mT @ G if state["right"] is not None else None, group["factor_beta"])
                work.append((param, G, state))
            self._refresh_roots(group, [state for _, _, state in work])
            for param, G, state in work:
                step = state["step"]
                if beta1 > 0:
                    moment = state["exp_avg"].lerp_(G, 1 - beta1) / (1 - beta1 ** step)
                else:
                    moment = G
                direction = moment
                if state["left_root"] is not None:
                    direction = state["left_root"] @ direction
                if state["right_root"] is not None:
                    direction = direction @ state["right_root"]
                if group["graft"] is not None:
                    if group["graft"] == "adam":
                        state["exp_avg_sq"].mul_(beta2).addcmul_(G, G, value=1 - beta2)
                        denominator = (state["exp_avg_sq"] / (1 - beta2 ** step)).sqrt_().add_(group["graft_eps"])
                        target = torch.linalg.vector_norm(moment / denominator)
                    else:
                        target = torch.linalg.vector_norm(moment)
                    norm = torch.linalg.vector_norm(direction)
                    direction = direction * torch.where(norm > 0, target / norm, torch.zeros_like(norm))
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(direction.view_as(param), alpha=-group["lr"])

    def _refresh_roots(self, group: dict[str, Any], states: list[dict[str, Any]]) -> None:
        due = [s for s in states if (s["step"] - 1) % group["precondition_frequency"] == 0]
        factors = [(s, side) for s in due for side in ("left", "right") if s[side] is not None]
        roots = spread([s[side] for s, side in factors],
                       lambda _, F: inverse_root(F, group["epsilon"], group["root_dtype"]),
                       [s[side].shape[0] ** 3 for s, side in factors],
                       process_group=self.process_group, enabled=self.distributed)
        for (s, side), root in zip(factors, roots):
            s[f"{side}_root"] = root.to(s[side].dtype)
