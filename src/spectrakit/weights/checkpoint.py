"""A Hugging Face checkpoint folder opened for block-by-block work, without loading it.

:class:`Checkpoint` pairs the folder's tensors (read one at a time through
:func:`~spectrakit.weights.files.stored_tensors`, from safetensors shards and their index or
a torch checkpoint) with the model skeleton that ``config.json`` describes. The skeleton is
built by the model's own transformers class, with every *parameter* on the meta device
(no memory, no initialization) and every buffer real, so that values a constructor
computes rather than stores (rotary frequencies, causal masks) are exactly those of a
model built normally. :meth:`Checkpoint.materialize` then puts chosen parameters' stored
tensors in place (every name of a tied parameter at once) and :meth:`Checkpoint.release`
sends a finished module back to the meta device, so that a verb holds one decoder block
at a time.

>>> import tempfile, torch, transformers
>>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=16)
>>> folder = tempfile.mkdtemp()
>>> transformers.GPT2LMHeadModel(config).save_pretrained(folder)
>>> checkpoint = Checkpoint(folder)
>>> model = checkpoint.skeleton()
>>> model.transformer.h[0].attn.c_attn.weight.is_meta
True
>>> checkpoint.materialize(model, ["transformer.h.0.attn.c_attn.weight"])
>>> model.transformer.h[0].attn.c_attn.weight.shape, model.transformer.h[0].attn.c_attn.weight.is_meta
(torch.Size([16, 48]), False)
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spectrakit.errors import SpectrakitError
from spectrakit.weights.files import stored_tensors
from spectrakit.weights.record import one_line

__all__ = ["Checkpoint", "decoder_blocks"]


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device and keep real buffers.

    ``torch.device("meta")`` would put buffers there too, and a buffer the constructor
    computes (rotary ``inv_freq``) would then hold no value; this moves each parameter as
    it is registered instead (its CPU allocation is never written, so it costs no memory).
    """
    register = nn.Module.register_parameter

    def on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of blocks: the ``nn.ModuleList`` of modules of one class that holds
    the most parameters (``model.layers`` of a Llama, ``transformer.h`` of a GPT-2), and its
    name.

    Args:
        model: a transformer (its parameters may be on the meta device).
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None or best[0] == 0:
        raise SpectrakitError(f"{type(model).__name__}: no stack of blocks (an nn.ModuleList of layers of one "
                              "class) to work through block by block")
    return best[1], best[2]


class Checkpoint:
    """A Hugging Face model folder (``config.json`` and its weights), read tensor by tensor.

    Args:
        folder: the model folder: ``config.json`` beside safetensors shards and their
            index, ``model.safetensors``, or a torch checkpoint (read through
            :func:`~spectrakit.weights.files.stored_tensors`).
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise SpectrakitError(f"{self.folder}: not a folder (a Hugging Face checkpoint folder is expected)")
        config_file = self.folder / "config.json"
        if not config_file.is_file():
            raise SpectrakitError(f"{self.folder}: not a Hugging Face checkpoint (no config.json)")
        try:
            self.config_dict: dict[str, Any] = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise SpectrakitError(f"{config_file}: cannot read ({one_line(error)})") from None
        self.tensors = stored_tensors(self.folder)
        self._names: dict[str, str] = {}

    def skeleton(self) -> nn.Module:
        """The model ``config.json`` describes, its parameters on the meta device (see the
        module docstring), in eval mode. Built by the class ``architectures`` names, else
        ``AutoModelForCausalLM``; never remote code, and the caller's RNG is left as it was.
        """
        try:
            import transformers
        except ImportError:
            raise SpectrakitError("working on a Hugging Face checkpoint needs transformers: "
                                  "pip install 'spectrakit[hf]'") from None
        try:
            config = transformers.AutoConfig.from_pretrained(self.folder, local_files_only=True)
        except Exception as error:  # transformers raises many types for a bad config
            raise SpectrakitError(f"{self.folder / 'config.json'}: not a usable model config "
                                  f"({one_line(error)})") from None
        architecture = (getattr(config, "architectures", None) or [""])[0]
        cls = getattr(transformers, architecture, None)
        try:
            with torch.random.fork_rng(devices=[]), _parameters_on_meta():
                if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
                    model = cls(config)
                else:
                    model = transformers.AutoModelForCausalLM.from_config(config)
        except Exception as error:
            raise SpectrakitError(f"{self.folder}: cannot build the model from config.json "
                                  f"({one_line(error)})") from None
        return model.eval()

    def stored_name(self, name: str) -> str:
        """The checkpoint's name for the model's parameter or buffer ``name`` (the same, or
        with the base model's prefix added or dropped, as older checkpoints store it)."""
        if name in self._names:
            return self._names[name]
        candidates = [name]
        head, _, rest = name.partition(".")
        if rest:
            candidates.append(rest)  # "transformer.h.0..." stored as "h.0..."
        candidates += [f"{prefix}.{name}" for prefix in ("model", "transformer")]
        for candidate in candidates:
            if candidate in self.tensors:
                self._names[name] = candidate
                return candidate
        raise SpectrakitError(f"{self.folder}: no tensor {name!r} in the checkpoint (the model built from "
                              "config.json has it)")

    def has(self, name: str) -> bool:
        """Whether the checkpoint stores the model's tensor ``name`` (under any form of it).

        Args:
            name: a parameter or buffer name of the skeleton.
        """
        try:
            self.stored_name(name)
        except SpectrakitError:
            return False
        return True

    def load(self, name: str) -> torch.Tensor:
        """The stored tensor of the model's parameter or buffer ``name``, read now, as stored.

        Args:
            name: a parameter or buffer name of the skeleton.
        """
        return self.tensors[self.stored_name(name)].read()

    def materialize(self, model: nn.Module, names: Iterable[str]) -> None:
        """Replace the meta parameters ``names`` of ``model`` by their stored tensors (frozen).

        A tied parameter is read once and set under every name it has, so the tie holds.
        A name that already holds data is left alone.

        Args:
            model: the skeleton from :meth:`skeleton`.
            names: parameter names of ``model``.
        """
        aliases: dict[int, list[str]] = {}
        by_name: dict[str, nn.Parameter] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(param), []).append(name)
            by_name[name] = param
        done: set[int] = set()
        for name in names:
            if name not in by_name:
                raise SpectrakitError(f"the model has no parameter {name!r}")
            param = by_name[name]
            if not param.is_meta or id(param) in done:
                continue
            group = aliases[id(param)]
            stored = next((n for n in group if self.has(n)), group[0])
            tensor = self.load(stored)
            if tuple(tensor.shape) != tuple(param.shape):
                raise SpectrakitError(f"{self.folder}: tensor {self.stored_name(stored)} has shape "
                                      f"{tuple(tensor.shape)}; config.json makes it {tuple(param.shape)}")
            new = nn.Parameter(tensor, requires_grad=False)
            for alias in group:
                owner, _, leaf = alias.rpartition(".")
                model.get_submodule(owner)._parameters[leaf] = new
            done.add(id(param))

    def load_buffers(self, module: nn.Module, prefix: str) -> None:
        """Replace ``module``'s persistent buffers the checkpoint stores by their stored values
        (buffers it does not store keep the values the constructor computed).

        Args:
            module: a submodule of the skeleton.
            prefix: its name in the model (``"model.layers.3"``).
        """
        for name, buffer in list(module.named_buffers()):
            owner, _, leaf = name.rpartition(".")
            parent = module.get_submodule(owner)
            full = f"{prefix}.{name}" if prefix else name
            if leaf in parent._non_persistent_buffers_set or not self.has(full):
                continue
            parent._buffers[leaf] = self.load(full).to(buffer.dtype)

    @staticmethod
    def release(module: nn.Module) -> None:
        """Send ``module``'s parameters and buffers back to the meta device (frees them).

        Args:
            module: a submodule that is done with.
        """
        module.to("meta")
