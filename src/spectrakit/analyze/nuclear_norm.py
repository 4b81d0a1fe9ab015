"""Matrix Nuclear-Norm of a language model's responses (Li et al., *Large Language Model
Evaluation via Matrix Nuclear-Norm*, 2024).

For a batch, the response matrix ``A`` stacks the softmax distributions of the model's
outputs, one row per position (``N`` rows, ``V`` columns, each row summing to 1). Its
nuclear norm ``‖A‖_* = Σσᵢ(A)`` is large when the predictions are both confident
(discriminability) and spread over many classes (diversity). Divided by the number of rows
— the length normalization, so that longer inputs do not score higher for their length —

    MNN = ‖A‖_* / N,        MNN_{L1,2} = (Σ of the min(N, V) largest column norms ‖A_{:,j}‖₂) / N,

the second being the SVD-free L1,2 approximation the paper uses (also used on features by
:func:`~spectrakit.analyze.feature_spectrum`). Both lie in ``[1/√N·‖p‖, 1]``-ish ranges:
``N`` distinct one-hot rows give exactly 1; ``N`` copies of one distribution ``p`` give
``‖p‖₂/√N``.

>>> import torch
>>> A = torch.eye(4, 10, dtype=torch.float64)            # 4 confident, distinct predictions
>>> response_nuclear_norm(A)["mnn"]
1.0
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .. import linalg
from ..errors import SpectrakitError
from .curvature.operators import Forward, default_forward, output_tensor


def response_nuclear_norm(probabilities: torch.Tensor) -> dict[str, float]:
    """``{"mnn", "mnn_l12", "rows"}`` of one response matrix (rows = positions, columns = classes).

    Args:
        probabilities: ``N × V`` softmax outputs (more leading dimensions are flattened into rows).
    """
    A = probabilities.detach().reshape(-1, probabilities.shape[-1]).double()
    rows = A.shape[0]
    if rows == 0:
        raise SpectrakitError("the response matrix has no rows")
    nuclear = float(linalg.svdvals(A).sum())
    l12 = float(A.norm(dim=0).topk(min(A.shape)).values.sum())
    return {"mnn": nuclear / rows, "mnn_l12": l12 / rows, "rows": rows}


def matrix_nuclear_norm(model: nn.Module, batches: Iterable[Any], *, forward: Forward | None = None,
                        drop_last_position: bool = True) -> dict[str, float]:
    """The length-normalized Matrix Nuclear-Norm of ``model``'s responses, exact and L1,2,
    averaged over ``batches``.

    Args:
        model: the model (a Hugging Face causal LM, or any module returning logits).
        batches: batches as for :func:`~spectrakit.analyze.hessian` (a tensor of token ids
            for a causal LM).
        forward: ``forward(model, batch)`` → ``(outputs, target)``.
        drop_last_position: for ``B × T × V`` logits, leave out the last position (it
            predicts past the input).
    """
    forward = forward or default_forward
    totals = {"mnn": 0.0, "mnn_l12": 0.0}
    count = 0
    with torch.no_grad():
        for batch in batches:
            logits = output_tensor(forward(model, batch)[0])
            if logits.ndim == 3 and drop_last_position:
                logits = logits[:, :-1]
            result = response_nuclear_norm(logits.double().softmax(dim=-1))
            totals["mnn"] += result["mnn"]
            totals["mnn_l12"] += result["mnn_l12"]
            count += 1
    if not count:
        raise SpectrakitError("batches: no batches given (the iterable is empty)")
    return {key: value / count for key, value in totals.items()} | {"batches": count}
