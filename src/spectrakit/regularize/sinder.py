"""SINDER: find the blocks whose leading singular direction makes high-norm defect tokens, and repair them.

Wang, Zhang & Salzmann, *SINDER: Repairing the Singular Defects of DINOv2*, ECCV 2024. Some
patch tokens of a ViT come out with a huge norm along one direction. Linearizing each block
``x ↦ x + f_l(x)`` on a single token (attention reduces to its value path there) gives a matrix
``A_l``; the defect direction of the network up to block ``l`` is the leading left singular
vector of ``A_l ⋯ A_1``, and a block whose own ``A_l`` has a dominant singular value
(``σ₁ ≫ σ₂``) is where the defect is made. Here:

* :func:`block_linearization` — ``A_l`` by least squares on random single tokens (the paper does
  this for the MLP; on one token it covers the whole block, attention included).
* :func:`singular_defects` — per block: its leading left singular vector ``u_l``, ``σ₁/σ₂``,
  the accumulated direction, and — given real tokens — how far the block raises the largest token
  norm over the median one and how well the high-norm tokens align with ``u_l``.
  :attr:`DefectReport.defective` lists the blocks that both create outlier tokens and align them
  with their own leading direction; :attr:`DefectReport.layers` ranks each such block's Linear
  layers by how well their own leading left singular vector matches it (:func:`defect_layers`).
* :func:`singular_value_finetune` — the paper's repair parametrization: each selected Linear's
  weight becomes ``U diag(σ + ε) Vᵀ`` (SVD from :func:`spectrakit.linalg.svd`) with only ``ε``
  trained (``ε = 0`` at the start, so the model is unchanged).
* :func:`neighbor_loss` — the smoothness loss: each token aligned with the defect direction is
  pulled towards the 3 × 3 Gaussian-weighted mean of its neighbours, each neighbour weighted
  ``exp(−|cos(x_j, d)| / τ)`` so that defective neighbours count little, divided by the mean
  token norm.

>>> import torch, spectrakit as sk
>>> blocks = [torch.nn.Linear(8, 8) for _ in range(3)]
>>> report = sk.regularize.singular_defects(blocks, dim=8, samples=256)
>>> len(report.directions), report.directions[0].shape
(3, torch.Size([8]))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import SpectrakitError
from ..linalg import svd


def _first(output: object) -> torch.Tensor:
    """A block's hidden states: Hugging Face layers return a tuple whose first entry they are."""
    while isinstance(output, (tuple, list)) and output:
        output = output[0]
    return output  # type: ignore[return-value]


@torch.no_grad()
def block_linearization(block: nn.Module, dim: int, *, samples: int = 4096, seed: int = 0) -> torch.Tensor:
    """``A`` (``dim × dim``) with ``block(x) ≈ A x + c`` in least squares over Gaussian single tokens.

    Args:
        block: maps ``(batch, tokens, dim)`` (or ``(batch, dim)``) to the same shape; a tuple
            output (Hugging Face layers) is read at its first entry.
        dim: the token width.
        samples: how many random tokens.
        seed: the tokens' seed.
    """
    parameter = next(iter(block.parameters()), None)
    dtype = parameter.dtype if parameter is not None else torch.float32
    device = parameter.device if parameter is not None else None
    X = torch.randn(samples, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    X = X.to(dtype=dtype, device=device)
    try:
        Y = _first(block(X[:, None, :]))[:, 0, :]
    except (RuntimeError, IndexError, ValueError):
        Y = _first(block(X))
    if not isinstance(Y, torch.Tensor) or Y.shape != X.shape:
        shape = tuple(Y.shape) if isinstance(Y, torch.Tensor) else type(Y).__name__
        raise SpectrakitError(f"block_linearization: the block maps {dim}-wide tokens to {shape}, not to tokens "
                              "of the same width")
    design = torch.cat([X, torch.ones(samples, 1, dtype=X.dtype, device=X.device)], dim=1).double()
    solution = torch.linalg.lstsq(design, Y.double()).solution  # (dim + 1) × dim
    return solution[:dim].mT.contiguous()


@dataclass
class DefectReport:
    """What :func:`singular_defects` found, one entry per block.

    Args:
        directions: the leading left singular vector ``u_l`` of each block's linearization ``A_l``.
        gaps: ``σ₁/σ₂`` of each ``A_l``.
        accumulated: the leading left singular vector of ``A_l ⋯ A_1``.
        outlier_gain: how much each block multiplies the (largest ÷ median) token norm (with tokens).
        alignment: ``|cos(u_l, largest output token)|`` per block (with tokens).
        defective: the blocks that make the defect.
        layers: per defective block, ``(layer name, |cos(u₁(W), u_l)|, σ₁/σ₂ of W)`` for its Linear
            layers that write into the token width, most aligned first (:func:`defect_layers`).
    """

    directions: list[torch.Tensor]
    gaps: list[float]
    accumulated: list[torch.Tensor]
    outlier_gain: list[float] = field(default_factory=list)
    alignment: list[float] = field(default_factory=list)
    defective: list[int] = field(default_factory=list)
    layers: dict[int, list[tuple[str, float, float]]] = field(default_factory=dict)


def defect_layers(block: nn.Module, direction: torch.Tensor) -> list[tuple[str, float, float]]:
    """The Linear layers of ``block`` that write ``direction``-wide outputs, ranked by how well
    their leading left singular vector aligns with ``direction``: ``(name, |cos|, σ₁/σ₂)``.

    Args:
        block: one transformer block.
        direction: the block's defect direction (``dim``).
    """
    ranked = []
    for name, layer in block.named_modules():
        if isinstance(layer, nn.Linear) and layer.out_features == direction.shape[0]:
            u, gap = _leading(layer.weight.detach().double())
            ranked.append((name, float((u @ direction.double().to(u.device)).abs()), gap))
    return sorted(ranked, key=lambda item: -item[1])


def _leading(A: torch.Tensor) -> tuple[torch.Tensor, float]:
    U, S, _ = svd(A, method="exact")
    return U[:, 0], float(S[0] / S[1].clamp_min(torch.finfo(S.dtype).tiny)) if S.shape[0] > 1 else float("inf")


def _outlier_ratio(tokens: torch.Tensor) -> torch.Tensor:
    norms = tokens.norm(dim=-1)
    return norms.amax(dim=-1) / norms.median(dim=-1).values.clamp_min(torch.finfo(norms.dtype).tiny)


@torch.no_grad()
def singular_defects(blocks: Sequence[nn.Module], dim: int, *, tokens: Sequence[torch.Tensor] | None = None,
                     samples: int = 4096, seed: int = 0, min_gain: float = 2.0,
                     min_alignment: float = 0.9) -> DefectReport:
    """Linearize every block and, given real tokens, point to the blocks that create the defect.

    Args:
        blocks: the transformer blocks in order.
        dim: the token width.
        tokens: optional ``len(blocks) + 1`` tensors ``(batch, n, dim)``: the input of the first
            block and every block's output on real data.
        samples, seed: the random tokens of :func:`block_linearization`.
        min_gain: a block is defective when it multiplies the largest-over-median token norm
            ratio by at least this much …
        min_alignment: … and its largest output token is this well aligned with ``u_l``.
    """
    if not blocks:
        raise SpectrakitError("singular_defects: no blocks given")
    maps = [block_linearization(b, dim, samples=samples, seed=seed + i) for i, b in enumerate(blocks)]
    directions, gaps, accumulated = [], [], []
    product = torch.eye(dim, dtype=torch.float64, device=maps[0].device)
    for A in maps:
        u, gap = _leading(A)
        directions.append(u)
        gaps.append(gap)
        product = A @ product
        accumulated.append(_leading(product)[0])
    report = DefectReport(directions, gaps, accumulated)
    if tokens is None:
        return report
    if len(tokens) != len(blocks) + 1:
        raise SpectrakitError(f"tokens: expected {len(blocks) + 1} tensors (the input and each block's output), "
                              f"got {len(tokens)}")
    for i, u in enumerate(directions):
        before, after = tokens[i].double(), tokens[i + 1].double()
        gain = float((_outlier_ratio(after) / _outlier_ratio(before)).mean())
        flat = after.reshape(-1, dim)
        largest = flat[flat.norm(dim=-1).argmax()]
        alignment = float((largest @ u.to(largest)).abs() / largest.norm().clamp_min(1e-300))
        report.outlier_gain.append(gain)
        report.alignment.append(alignment)
        if gain >= min_gain and alignment >= min_alignment:
            report.defective.append(i)
            report.layers[i] = defect_layers(blocks[i], u)
    return report


class SingularValueShift(nn.Module):
    """``W ↦ U diag(σ + ε) Vᵀ`` with ``U, σ, V`` frozen from the SVD at registration and ``ε`` trained.

    Args:
        W: the weight at registration.
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    def __init__(self, W: torch.Tensor) -> None:
        super().__init__()
        U, S, Vh = svd(W.detach(), method="exact")
        self.register_buffer("U", U)
        self.register_buffer("S", S)
        self.register_buffer("Vh", Vh)
        self.epsilon = nn.Parameter(torch.zeros_like(S))

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return (self.U * (self.S + self.epsilon)) @ self.Vh


def singular_value_finetune(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    """Register :class:`SingularValueShift` on the weight of every ``nn.Linear`` in ``modules``;
    returns the ``ε`` parameters (the only ones a repair should train).

    The layers' outputs are unchanged at registration; bake the repair in afterwards with
    :func:`spectrakit.regularize.remove_parametrizations`.

    Args:
        modules: modules (blocks) whose Linear layers are repaired.
    """
    shifts: list[nn.Parameter] = []
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, nn.Linear) and not parametrize.is_parametrized(layer, "weight"):
                shift = SingularValueShift(layer.weight)
                parametrize.register_parametrization(layer, "weight", shift)
                shifts.append(shift.epsilon)
    if not shifts:
        raise SpectrakitError("singular_value_finetune: no nn.Linear layer in the given modules")
    return shifts


_GAUSSIAN_3x3 = ((1.0, 2.0, 1.0), (2.0, 4.0, 2.0), (1.0, 2.0, 1.0))


def neighbor_loss(tokens: torch.Tensor, grid: tuple[int, int], direction: torch.Tensor, *,
                  temperature: float = 0.1, threshold: float = 0.001) -> torch.Tensor:
    """SINDER's smoothness loss on patch tokens ``(batch, h·w, dim)`` laid out on ``grid = (h, w)``.

    Tokens whose ``−|cos(x, d)|`` lies below its mean by more than ``threshold`` standard
    deviations (the defective ones, interior tokens only) are pulled to the weighted mean of their
    3 × 3 neighbourhood (weights: a Gaussian times ``exp(−|cos(x_j, d)| / temperature)``,
    detached); the distance is averaged and divided by the mean token norm. Zero when no token is
    defective.

    Args:
        tokens: the patch tokens of one layer.
        grid: their ``(height, width)`` arrangement.
        direction: the defect direction ``d`` (``dim``).
        temperature: ``τ`` of the neighbour weights.
        threshold: how many standard deviations below the mean marks a token defective.
    """
    h, w = grid
    if tokens.ndim != 3 or tokens.shape[1] != h * w:
        raise SpectrakitError(f"tokens: expected (batch, {h * w}, dim) patch tokens for grid {grid}, "
                              f"got shape {tuple(tokens.shape)}")
    if h < 3 or w < 3:
        raise SpectrakitError(f"grid={grid}: the 3 × 3 neighbourhoods need at least 3 × 3 patches")
    batch, _, dim = tokens.shape
    x = tokens.reshape(batch, h, w, dim)
    unit = direction.to(x.dtype) / direction.norm().clamp_min(1e-12)
    with torch.no_grad():
        cosine = (torch.nn.functional.normalize(x, dim=-1) @ unit).abs()       # (batch, h, w)
        logits = -cosine
        weights = (logits / temperature).exp()
        gaussian = torch.tensor(_GAUSSIAN_3x3, dtype=x.dtype, device=x.device)
        patches = weights.unfold(1, 3, 1).unfold(2, 3, 1) * gaussian           # (batch, h−2, w−2, 3, 3)
        patches = patches / patches.sum(dim=(-1, -2), keepdim=True)
        flat = logits.reshape(batch, -1)
        cut = flat.mean(1) - threshold * flat.std(1)
        mask = logits[:, 1:-1, 1:-1] < cut[:, None, None]
        scale = x[:, 1:-1, 1:-1].norm(dim=-1).mean()
    if not bool(mask.any()):
        return tokens.sum() * 0
    neighbourhoods = x.detach().unfold(1, 3, 1).unfold(2, 3, 1)                # (batch, h−2, w−2, dim, 3, 3)
    smooth = (neighbourhoods * patches[:, :, :, None]).sum(dim=(-1, -2))
    distance = (x[:, 1:-1, 1:-1] - smooth).norm(dim=-1)
    return distance[mask].mean() / scale


def sinder_repair(layers: Iterable[nn.Module], batches: Iterable[object],
                  tokens_of: Callable[[object], torch.Tensor], grid: tuple[int, int], direction: torch.Tensor, *,
                  steps: int = 50, lr: float = 1e-3) -> list[float]:
    """Singular-value fine-tuning of ``layers`` against :func:`neighbor_loss`; returns the losses.

    Args:
        layers: the modules to repair (their Linear weights get :class:`SingularValueShift`).
        batches: input batches, cycled.
        tokens_of: ``batch → (batch, h·w, dim)`` patch tokens at the defective layer's output.
        grid: the patch grid.
        direction: the defect direction at that layer.
        steps: optimizer steps.
        lr: Adam's learning rate on ``ε``.
    """
    shifts = singular_value_finetune(layers)
    optimizer = torch.optim.Adam(shifts, lr=lr)
    cached = list(batches)
    if not cached:
        raise SpectrakitError("sinder_repair: no batches given")
    losses = []
    for step in range(steps):
        loss = neighbor_loss(tokens_of(cached[step % len(cached)]), grid, direction)
        optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
            optimizer.step()
        losses.append(float(loss))
    return losses
