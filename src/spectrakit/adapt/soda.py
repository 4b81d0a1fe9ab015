"""SODA: singular values and their bases tuned, the bases by Kronecker-factored rotations
(Zhang et al., 2024; seed 003).

With the top-r triplets ``U_r, Σ_r, V_r`` of W (frozen) and rotations of the output and
input spaces, each a Kronecker product of two small orthogonal matrices:

    W' = W − U_r Σ_r V_rᵀ + (Q_out U_r) diag(s) (Q_in V_r)ᵀ,
    Q = Q₁ ⊗ Q₂,   Qᵢ = Cayley(Kᵢ) = (I − Kᵢ)⁻¹(I + Kᵢ),   Kᵢ skew-symmetric,

``s`` starting at ``σ_r`` and every ``K = 0`` (so ``Q = I``): exact at initialization. For a
side of size ``d = a·b`` (``a`` the largest divisor of ``d`` up to ``√d``) the rotation has
``a(a−1)/2 + b(b−1)/2`` free entries instead of ``d(d−1)/2``; ``Q`` is applied as
``(Q₁ ⊗ Q₂) v = vec(Q₁ mat(v) Q₂ᵀ)``, never formed; the forward rotates the ``r`` basis
vectors (work independent of the batch) and runs one rank-``2r`` product.
A prime ``d`` has no split (``a = 1``) and gets one full ``d × d`` rotation.
Trainable parameters per layer: ``r + Σ_{out, in} [a(a−1)/2 + b(b−1)/2]``. Merges exactly.

``orthogonal="stiefel"`` is the paper's form: the factors ``Qᵢ`` are themselves the parameters
(``a² + b²`` entries per side, starting at ``I``) and :class:`StiefelSGD` (see
:func:`stiefel_optimizer`) steps them on the orthogonal group — Riemannian SGD with momentum and
the Cayley retraction, so they stay orthogonal to rounding. With a plain optimizer they would
drift off it; the default Cayley map (``orthogonal="cayley"``) keeps ``Q`` orthogonal under any
optimizer.

>>> import torch, spectrakit as sk
>>> model = sk.adapt(torch.nn.Sequential(torch.nn.Linear(64, 32)), "soda", rank=4)
>>> sk.trainable_parameters(model)   # 4 values + out 32 = 4·8: 6 + 28 + in 64 = 8·8: 28 + 28
94
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import SpectrakitError
from ..optimize._base import MatrixOptimizer
from .base import AdaptedLinear, adapted_layers, register
from .lora import add_low_rank
from .spectral import cayley

ORTHOGONAL = ("cayley", "stiefel")


def kronecker_split(size: int) -> tuple[int, int]:
    """``(a, b)`` with ``a·b = size`` and ``a`` the largest divisor not above ``√size``."""
    a = max(d for d in range(1, math.isqrt(size) + 1) if size % d == 0)
    return a, size // a


def kronecker_apply(h: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Rows ``v`` of ``h`` mapped to ``(first ⊗ second) v`` (``v`` of size ``a·b``)."""
    a, b = first.shape[0], second.shape[0]
    blocks = h.reshape(*h.shape[:-1], a, b)
    return (first @ blocks @ second.T).reshape(h.shape)


@register
class SODALinear(AdaptedLinear):
    method = "soda"
    options = ("svd_method", "orthogonal")
    U: torch.Tensor
    V: torch.Tensor
    sigma: torch.Tensor

    def __init__(self, base_layer: nn.Module, rank: int, *, name: str = "", svd_method: str = "krylov",
                 orthogonal: str = "cayley", init: dict[str, Any] | None = None) -> None:
        super().__init__(base_layer, rank, name=name)
        self.svd_method, self.orthogonal = svd_method, orthogonal
        U, S, Vh = self.factors(rank, "top", svd_method)
        self.new_buffer("U", U)
        self.new_buffer("sigma", S)
        self.new_buffer("V", Vh.T)
        self.singular_values = self.new_parameter(S.clone())
        self.out_split, self.in_split = kronecker_split(self.out_features), kronecker_split(self.in_features)
        for side, (a, b) in (("out", self.out_split), ("in", self.in_split)):
            if orthogonal == "stiefel":
                setattr(self, f"rotation_{side}_1", self.new_parameter(torch.eye(a)))
                setattr(self, f"rotation_{side}_2", self.new_parameter(torch.eye(b)))
            else:
                setattr(self, f"skew_{side}_1", self.new_parameter(torch.zeros(a * (a - 1) // 2)))
                setattr(self, f"skew_{side}_2", self.new_parameter(torch.zeros(b * (b - 1) // 2)))

    @classmethod
    def check_layer(cls, name: str, out_features: int, in_features: int, kwargs: dict[str, Any]) -> None:
        super().check_layer(name, out_features, in_features, kwargs)
        if kwargs.get("orthogonal", "cayley") not in ORTHOGONAL:
            raise SpectrakitError(f"orthogonal={kwargs.get('orthogonal')!r} must be one of {', '.join(ORTHOGONAL)}")

    def rotations(self, side: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The two Kronecker factors of ``Q_out`` or ``Q_in``."""
        if self.orthogonal == "stiefel":
            return getattr(self, f"rotation_{side}_1"), getattr(self, f"rotation_{side}_2")
        a, b = self.out_split if side == "out" else self.in_split
        return cayley(getattr(self, f"skew_{side}_1"), a), cayley(getattr(self, f"skew_{side}_2"), b)

    def orthogonal_factors(self) -> list[nn.Parameter]:
        """The ``Qᵢ`` parameters of the Stiefel form (empty for the Cayley form)."""
        if self.orthogonal != "stiefel":
            return []
        return [getattr(self, f"rotation_{side}_{k}") for side in ("out", "in") for k in (1, 2)]

    def bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``Q_out U_r`` and ``Q_in V_r``."""
        return (kronecker_apply(self.U.T, *self.rotations("out")).T,
                kronecker_apply(self.V.T, *self.rotations("in")).T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the rotations act on the r basis vectors (r·d·(a + b) work, independent of the batch), and
        # the tuned and the removed parts go through one rank-2r product: x [Ṽ V] diag(s, −σ) [Ũ U]ᵀ
        U, V = self.bases()
        down = torch.cat([V, self.V], dim=1)
        up = torch.cat([U * self.singular_values, self.U * -self.sigma], dim=1)
        return add_low_rank(self.base_layer(x), self.adapter_input(x), down, up.T)

    def delta_weight(self) -> torch.Tensor:
        U, V = self.bases()
        return (U * self.singular_values) @ V.T - (self.U * self.sigma) @ self.V.T


class StiefelSGD(MatrixOptimizer):
    """Riemannian SGD with momentum on square orthogonal matrices, Cayley retraction; groups
    with ``adamw=True`` are stepped by AdamW (SODA's singular values).

    For ``Q`` with Euclidean gradient ``G``: ``A = G Qᵀ − Q Gᵀ`` (skew; the Riemannian gradient is
    ``A Q``), ``M ← μ M + A`` and ``Q ← (I + η/2 · M)⁻¹ (I − η/2 · M) Q``: the Cayley transform of a
    skew matrix is orthogonal, so ``Q`` stays on the group, and ``−A Q`` is a descent direction.

    Args:
        params: parameters or param groups (``adamw=True`` groups: AdamW with their ``lr``).
        lr: step size ``η`` of the orthogonal groups.
        momentum: ``μ``.
    """

    def __init__(self, params: Any, lr: float = 1e-2, momentum: float = 0.9) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum}, distributed=False)

    def check_group(self, group: dict[str, Any]) -> None:
        if group.get("adamw"):
            return
        for position, param in enumerate(group["params"]):
            if param.ndim != 2 or param.shape[0] != param.shape[1]:
                raise SpectrakitError(f"{self.param_name(group, position)}: StiefelSGD steps square orthogonal "
                                      f"matrices, not shape {tuple(param.shape)}")

    def matrix_step(self, groups: list[dict[str, Any]]) -> None:
        for group in groups:
            half_step, momentum = group["lr"] / 2, group["momentum"]
            for _, Q, G in self.named_grads(group):
                A = G @ Q.T - Q @ G.T
                state = self.state[Q]
                buffer = state.get("momentum")
                buffer = A if buffer is None else buffer.mul_(momentum).add_(A)
                state["momentum"] = buffer
                eye = torch.eye(Q.shape[0], dtype=Q.dtype, device=Q.device)
                Q.copy_(torch.linalg.solve(eye + half_step * buffer, (eye - half_step * buffer) @ Q))


def stiefel_optimizer(model: nn.Module, lr: float = 1e-2, adamw_lr: float = 1e-2,
                      momentum: float = 0.9) -> StiefelSGD:
    """One optimizer for a model adapted with ``"soda"``, ``orthogonal="stiefel"``: the ``Qᵢ`` on the
    orthogonal group (:class:`StiefelSGD`), every other trainable parameter by AdamW.

    Args:
        model: the adapted model.
        lr: the orthogonal factors' step size.
        adamw_lr: AdamW's learning rate for the rest (the singular values).
        momentum: the orthogonal factors' momentum.
    """
    factors = [p for layer in adapted_layers(model).values() if isinstance(layer, SODALinear)
               for p in layer.orthogonal_factors()]
    if not factors:
        raise SpectrakitError("stiefel_optimizer: the model has no 'soda' adapters with orthogonal='stiefel'")
    chosen = {id(p) for p in factors}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
    groups: list[dict[str, Any]] = [{"params": factors}]
    if rest:
        groups.append({"params": rest, "adamw": True, "lr": adamw_lr, "betas": (0.9, 0.999), "weight_decay": 0.0})
    return StiefelSGD(groups, lr=lr, momentum=momentum)

