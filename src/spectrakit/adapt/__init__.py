"""Fine-tuning inside a weight's own spectrum: SVD-based adapters behind one API.

>>> import torch, spectrakit as sk
>>> model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
>>> _ = sk.adapt(model, "svfit", rank=4)       # in place; returns the model
>>> sk.trainable_parameters(model)
8
>>> sk.save_adapter(model, "svfit.safetensors")  # doctest: +SKIP
>>> _ = sk.merge(model)                          # plain nn.Linear layers again

Methods (one file each, the formula in its docstring): ``lora`` (and rsLoRA),
``pissa``, ``milora``, ``soma``, ``svfit``, ``svft``, ``sorsa``, ``salt``, ``eva``,
``spectral``, ``hra``, ``fourierft``, and ``asymmetric``, ``lorma``, ``qgoft``, ``ba-lora``,
``sst``, ``sara``, ``soda``, ``dota``, ``clover``, ``lq-lora``. Every method is exact at
initialization (``lq-lora``: exactly its own quantized decomposition of W).
:func:`merge_adapters` combines several saved adapters (linear, task arithmetic, TIES,
DARE, SVD); :func:`federated_round` is FedSVD's server step. :func:`init_from_checkpoint`
initializes an SVD adapter from a checkpoint folder one tensor at a time (a residual
checkpoint plus a saved adapter).

``spectrakit.adapt`` at the top level is the function; every other public name of this
package rides on it as an attribute, so ``sk.adapt.federated_round(global_model, clients)``
and ``from spectrakit.adapt import federated_round`` are the same function.

Importing this package needs only torch; ``export_peft`` imports peft-free code, and
``safetensors`` is loaded when saving or loading.
"""

from __future__ import annotations

from .api import (
           adapt,
           adapter_config,
           adapter_penalty,
           load_adapter,
           merge,
           read_adapter,
           save_adapter,
           trainable_parameters,
)
from .base import AdaptedLinear, find_targets, methods
from .federated import federated_client, federated_round
from .low_memory import init_from_checkpoint
from .merging import combine_updates, merge_adapters
from .peft_export import export_peft

__all__ = ["AdaptedLinear", "adapt", "adapter_config", "adapter_penalty", "combine_updates", "export_peft",
           "federated_client", "federated_round", "find_targets",
           "init_from_checkpoint", "load_adapter", "merge", "merge_adapters",
           "methods", "read_adapter", "save_adapter", "trainable_parameters"]

# `import spectrakit as sk` binds sk.adapt to the function (the verb); the package's other
# public names hang on it so that the dotted spelling of the docs, sk.adapt.<name>, resolves
for _name in __all__:
    if _name != "adapt":
        setattr(adapt, _name, globals()[_name])
del _name
