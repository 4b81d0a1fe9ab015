"""The bundled reference model: a small byte-level Llama pretrained on Python code.

The folder holds three files written by ``scripts/train_reference.py``:

* ``config.json`` -- the Hugging Face ``LlamaConfig`` (vocabulary of 256 byte values),
* ``model.safetensors`` -- float32 weights,
* ``training.json`` -- the training command, seed, wall time and held-out metrics.

The model reads raw UTF-8 bytes (ids 0..255), so no tokenizer is needed and
nothing is downloaded.

>>> from spectrakit.reference import reference_model, encode, decode  # doctest: +SKIP
>>> model = reference_model()  # doctest: +SKIP
>>> ids = encode("def add(a, b):\\n    return ")[None]  # doctest: +SKIP
>>> logits = model(ids).logits  # [1, seq, 256]  # doctest: +SKIP
>>> decode(logits[0, -1].argmax())  # doctest: +SKIP
'a'

Loading the model needs ``transformers`` (``pip install 'spectrakit[hf]'``);
everything else here needs only torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from spectrakit.errors import SpectrakitError

if TYPE_CHECKING:  # transformers is optional: imported where the model is built
    from transformers import LlamaForCausalLM

__all__ = [
    "REFERENCE_DIR",
    "reference_weights_path",
    "reference_config",
    "reference_info",
    "reference_model",
    "encode",
    "decode",
]

#: The folder that holds ``config.json``, ``model.safetensors`` and ``training.json``.
REFERENCE_DIR = Path(__file__).resolve().parent

_CONFIG = "config.json"
_WEIGHTS = "model.safetensors"
_INFO = "training.json"


def _existing(name: str) -> Path:
    path = REFERENCE_DIR / name
    if not path.is_file():
        raise SpectrakitError(
            f"reference model file {path} is missing; reinstall spectrakit or run scripts/train_reference.py"
        )
    return path


def _read_json(name: str) -> dict[str, Any]:
    path = _existing(name)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SpectrakitError(f"cannot read {path}: {exc}") from exc


def reference_weights_path() -> Path:
    """Path of the shipped ``model.safetensors`` (float32 weights)."""
    return _existing(_WEIGHTS)


def reference_config() -> dict[str, Any]:
    """The shipped Hugging Face config (``config.json``) as a dict.

    >>> reference_config()["vocab_size"]  # doctest: +SKIP
    256
    """
    return _read_json(_CONFIG)


def reference_info() -> dict[str, Any]:
    """The recorded training run (``training.json``): command, seed, steps, wall time,
    final train loss, held-out bits per byte on code and docs, unigram baseline.

    >>> info = reference_info()  # doctest: +SKIP
    >>> info["val_bpb_code"] < info["unigram_bpb_code"]  # doctest: +SKIP
    True
    """
    return _read_json(_INFO)


def encode(text: str | bytes) -> torch.Tensor:
    """Text (or raw bytes) -> LongTensor of byte ids 0..255 (UTF-8 for ``str``).

    Args:
        text: a string (encoded as UTF-8) or bytes.

    >>> encode("hé").tolist()
    [104, 195, 169]
    """
    if isinstance(text, str):
        raw = text.encode("utf-8")
    elif isinstance(text, (bytes, bytearray, memoryview)):
        raw = bytes(text)
    else:
        raise SpectrakitError(f"encode() takes str or bytes, got {type(text).__name__}")
    return torch.tensor(list(raw), dtype=torch.long)


def decode(ids: torch.Tensor | Iterable[int] | int) -> str:
    """Byte ids -> text (UTF-8, invalid sequences replaced by U+FFFD).

    >>> decode(encode("naïve ∑"))
    'naïve ∑'
    """
    if isinstance(ids, torch.Tensor):
        values = ids.reshape(-1).tolist()
    elif isinstance(ids, int):
        values = [ids]
    else:
        values = [int(i) for i in ids]
    bad = [v for v in values if not 0 <= v <= 255]
    if bad:
        raise SpectrakitError(f"decode() got ids outside 0..255, e.g. {bad[0]}")
    return bytes(values).decode("utf-8", errors="replace")


def reference_model(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """The shipped model as a ``transformers.LlamaForCausalLM`` in eval mode.

    Built from ``config.json`` and filled from ``model.safetensors`` with
    ``safetensors.torch.load_file`` (no pickle, no network). The global torch RNG
    is left as it was.

    Args:
        dtype: the parameters' dtype (float32 by default).

    >>> model = reference_model()  # doctest: +SKIP
    >>> sum(p.numel() for p in model.parameters())  # doctest: +SKIP
    3035392
    """
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as exc:
        raise SpectrakitError("reference_model() needs transformers: pip install 'spectrakit[hf]'") from exc
    from safetensors.torch import load_file

    config = LlamaConfig.from_dict(reference_config())
    path = reference_weights_path()
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise SpectrakitError(f"cannot read reference weights {path}: {exc}") from exc
    with torch.random.fork_rng(devices=[]):  # random init below must not move the caller's RNG
        model = LlamaForCausalLM(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise SpectrakitError(f"reference weights {path} do not match config.json: {first}") from exc
    # transformers declares PreTrainedModel.to through functools.wraps(nn.Module.to), which types it unbound
    return model.to(dtype=dtype).eval()  # type: ignore[call-arg]
