"""Low-rank compression: truncated-SVD methods under one parameter budget.

>>> import torch, spectrakit as sk
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
>>> batches = [torch.randn(256, 64) for _ in range(4)]
>>> report = sk.compress(model, method="svd-llm", ratio=0.3, calibration=batches, allocation="global")
>>> report.parameters_after == sum(p.numel() for p in model.parameters())
True
>>> sk.save_compressed(model, "small", report)   # doctest: +SKIP

Methods, one file each with its formula: ``svd`` (plain truncation), ``asvd``
(activation-scaled), ``fwsvd`` (Fisher row weights), ``gfwsvd`` (Kronecker-factored
Fisher, both sides), ``svd-llm`` (truncation-aware whitening), ``svd-llm-v2`` (two-SVD
truncation). Ranks: ``ratio=`` / ``rank=`` / ``energy=``, ``allocation="uniform"``,
``"global"`` (marginal loss per parameter), ``"heterogeneous"`` (SVD-LLM V2) or
``"sensitivity"`` (ASVD's search); ``lora_update=True`` fine-tunes the factors afterwards.
``modegpt`` (MoDeGPT) narrows the MLP and attention widths instead (attention becomes a
:class:`NarrowAttention`).
Each compressed layer becomes a :class:`LowRankLinear` (``method="monarch"``/``"btt"``: a
:class:`MonarchLinear` / :class:`BlockTensorTrainLinear`); :func:`save_compressed` /
:func:`load_compressed` persist it.

Importing this package needs only torch; transformers and safetensors load when used.
"""

from __future__ import annotations

from .api import METHODS, CompressionReport, LayerReport, compress, count_parameters, find_layers
from .base import CompressionWarning
from .lowrank import LowRankLinear, break_even_rank
from .narrow_attention import NarrowAttention
from .persist import load_compressed, read_config, save_compressed
from .structured import BlockTensorTrainLinear, MonarchLinear

__all__ = ["METHODS", "BlockTensorTrainLinear", "CompressionReport", "CompressionWarning", "LayerReport",
           "LowRankLinear", "MonarchLinear", "NarrowAttention", "break_even_rank", "compress", "count_parameters",
           "find_layers", "load_compressed", "read_config", "save_compressed"]
