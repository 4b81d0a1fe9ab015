r"""GaLore: the base optimizer run on a low-rank projection of the gradient.

For a weight matrix ``W`` (``m × n``, ``m ≤ n``; otherwise the same on the right) with
gradient ``G_t`` and an orthonormal ``m × r`` basis ``P`` (refreshed every
``update_every`` steps from the current gradient):

    R_t = Pᵀ G_t                       (r × n: the small space)
    N_t = base(R_t)                    (AdamW's m̂/(√v̂ + ε), or SGD-momentum's buffer,
                                        its state kept r × n)
    W_t = (1 − ηλ)·W_{t−1} − η·α·P N_t (α = ``scale``)

``projection="svd"`` takes ``P`` = the top-``r`` singular vectors of ``G_t``
(Zhao et al., 2024); ``projection="dct"`` the ``r`` columns of a fixed orthonormal DCT
basis with the largest energy ``‖D_jᵀ G_t‖²`` (the SVD-free variant), which needs no SVD
and stores only ``r`` indices. The base optimizer's moments are kept across refreshes,
as in the reference code. State is ``2·r·n`` (+ ``m·r`` for an SVD basis) per matrix,
against AdamW's ``2·m·n``. At full rank (``rank = min(m, n)``) every basis spans the whole
space, and ``P = I`` is used: a rotated basis would change nothing for SGD but would run
Adam in rotated coordinates (Adam is not rotation invariant), so with ``scale=1`` a
full-rank GaLore is exactly its base optimizer, AdamW or SGD.

>>> import torch, spectrakit as sk
>>> layer = torch.nn.Linear(16, 8, bias=False)
>>> opt = sk.optimize.GaLore(layer.parameters(), rank=4, projection="dct")
>>> layer(torch.randn(4, 16)).square().sum().backward()
>>> opt.step()
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..errors import SpectrakitError
from ._base import MatrixOptimizer, as_matrix_view, check_count, check_fraction, check_nonnegative
from ._projection import dct_basis, dct_indices, left_side, svd_basis

PROJECTIONS = ("svd", "dct")
BASES = ("adamw", "sgd")


class GaLore(MatrixOptimizer):
    """Gradient low-rank projection (see the module docstring for the formula).

    Args:
        params: matrices (conv kernels allowed), named parameters or param groups.
        lr: learning rate ``η``.
        rank: ``r``, at most ``min(m, n)`` of every matrix.
        update_every: steps between projection refreshes.
        scale: ``α``.
        projection: ``"svd"`` or ``"dct"``.
        base: ``"adamw"`` or ``"sgd"`` (with ``momentum``).
        betas, eps: AdamW's.
        momentum: SGD's.
        weight_decay: decoupled weight decay ``λ``.
        distributed, process_group, check_finite: see :class:`._base.MatrixOptimizer`.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, rank: int = 128, update_every: int = 200,
                 scale: float = 0.25, projection: str = "svd", base: str = "adamw",
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, momentum: float = 0.9,
                 weight_decay: float = 0.0, *, distributed: bool = True, process_group: object | None = None,
                 check_finite: bool = True) -> None:
        defaults = {"lr": lr, "rank": rank, "update_every": update_every, "scale": scale,
                    "projection": projection, "base": base, "betas": betas, "eps": eps, "momentum": momentum,
                    "weight_decay": weight_decay}
        super().__init__(params, defaults, distributed=distributed, process_group=process_group,
                         check_finite=check_finite)

    def check_group(self, group: dict[str, Any]) -> None:
        """Refuse bad GaLore options, and a rank above a matrix's shorter side, with one line.

        Args:
            group: a param group.
        """
        if group.get("adamw"):
            return
        check_count("rank", group["rank"], "GaLore")
        check_count("update_every", group["update_every"], "GaLore")
        check_nonnegative("scale", group["scale"], "GaLore")
        check_fraction("momentum", group["momentum"], "GaLore")
        for beta in group["betas"]:
            check_fraction("betas", beta, "GaLore")
        if group["projection"] not in PROJECTIONS:
            raise SpectrakitError(f"GaLore: projection={group['projection']!r} is not one of svd, dct")
        if group["base"] not in BASES:
            raise SpectrakitError(f"GaLore: base={group['base']!r} is not one of adamw, sgd")
        for position, param in enumerate(group["params"]):
            if param.ndim >= 2:
                shorter = min(param.shape[0], param[0].numel())
                if group["rank"] > shorter:
                    raise SpectrakitError(
                        f"{self.param_name(group, position)}: GaLore rank={group['rank']} exceeds the shorter "
                        f"side {shorter} of its {param.shape[0]}×{param[0].numel()} matrix")

    def matrix_step(self, groups: list[dict[str, Any]]) -> None:
        """Project, step the base optimizer in the small space, project back.

        Args:
            groups: the matrix param groups.
        """
        for group in groups:
            beta1, beta2 = group["betas"]
            for _, param, grad in self.named_grads(group):
                G = as_matrix_view(grad)
                state = self.state[param]
                if not state:
                    state["step"] = 0
                state["step"] += 1
                step = state["step"]
                full_rank = group["rank"] >= min(G.shape)
                if full_rank:
                    pass  # P = I: the small space is the whole space
                elif (step - 1) % group["update_every"] == 0:
                    if group["projection"] == "svd":
                        state["basis"] = svd_basis(G, group["rank"])
                    else:
                        state["indices"] = dct_indices(G, group["rank"])
                basis = None if full_rank else self._basis(G, state)
                left = left_side(G)
                small = G if basis is None else basis.mT @ G if left else G @ basis
                if group["base"] == "adamw":
                    if "exp_avg" not in state:
                        state["exp_avg"] = torch.zeros_like(small)
                        state["exp_avg_sq"] = torch.zeros_like(small)
                    state["exp_avg"].lerp_(small, 1 - beta1)
                    state["exp_avg_sq"].mul_(beta2).addcmul_(small, small, value=1 - beta2)
                    denominator = (state["exp_avg_sq"] / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
                    direction = state["exp_avg"] / (1 - beta1 ** step) / denominator
                else:
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = small.clone()
                    else:
                        state["momentum_buffer"].mul_(group["momentum"]).add_(small)
                    direction = state["momentum_buffer"]
                full = direction if basis is None else basis @ direction if left else direction @ basis.mT
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(full.view_as(param), alpha=-group["lr"] * group["scale"])

    @staticmethod
    def _basis(G: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        if "basis" in state:
            return state["basis"]
        side = G.shape[0] if left_side(G) else G.shape[1]
        return dct_basis(side, G.dtype, G.device)[:, state["indices"].long()]  # load_state_dict casts it
