"""Per-matrix work spread over the ranks of a ``torch.distributed`` group.

Under DDP every rank holds the same (all-reduced) gradients, so the optimizers that do
one expensive, independent computation per matrix — Muon's Newton–Schulz iteration,
SOAP's and Shampoo's eigendecompositions — let each rank do a share and then exchange
the results with one ``all_gather``. The share is balanced by cost (largest first, to
the least-loaded rank), and it is the same on every rank because it depends only on the
shapes. Each result is computed by exactly one rank with the same code a single process
runs, so the optimizer's parameters are bitwise those of one process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from .._distributed import owners as balance


def world(process_group: object | None, enabled: bool) -> tuple[int, int]:
    """``(rank, world_size)`` of the group the work is spread over; ``(0, 1)`` when off."""
    if not enabled or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(process_group), dist.get_world_size(process_group)  # type: ignore[arg-type]


def spread(inputs: Sequence[torch.Tensor], compute: Callable[[int, torch.Tensor], torch.Tensor],
           costs: Sequence[float], *, process_group: object | None = None,
           enabled: bool = True) -> list[torch.Tensor]:
    """``[compute(i, x) for i, x in enumerate(inputs)]``, each result of the input's shape,
    computed on one rank and all-gathered when a process group is up. Gathered results
    come back in the input's dtype (the same values: a bf16 result is exact in float32),
    a local one as it was computed, so one process pays for no cast."""
    rank, ranks = world(process_group, enabled)
    if ranks == 1 or not inputs:
        return [compute(i, x) for i, x in enumerate(inputs)]
    owners = balance(costs, ranks)
    wide = torch.float64 if any(x.dtype == torch.float64 for x in inputs) else torch.float32
    device = inputs[0].device
    shares = [[i for i in range(len(inputs)) if owners[i] == r] for r in range(ranks)]
    longest = max(sum(inputs[i].numel() for i in share) for share in shares)
    buffer = torch.zeros(longest, dtype=wide, device=device)
    offset = 0
    for i in shares[rank]:
        result = compute(i, inputs[i]).to(inputs[i].dtype)
        buffer[offset:offset + result.numel()] = result.reshape(-1).to(wide)
        offset += result.numel()
    gathered = [torch.empty_like(buffer) for _ in range(ranks)]
    dist.all_gather(gathered, buffer, group=process_group)
    outputs: list[torch.Tensor] = [inputs[0]] * len(inputs)
    for r, share in enumerate(shares):
        offset = 0
        for i in share:
            size = inputs[i].numel()
            outputs[i] = gathered[r][offset:offset + size].view(inputs[i].shape).to(inputs[i].dtype)
            offset += size
    return outputs
