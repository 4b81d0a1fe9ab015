"""Calibration statistics of the layers to compress, gathered with forward hooks.

One pass over the calibration batches fills, for each targeted layer with inputs
``x ∈ ℝ^{in}`` (every token is one row of ``X``, ``N`` rows in all):

* ``gram``   — the input second moment ``XᵀX = Σ x xᵀ`` (``in × in``, float64): SVD-LLM;
* ``output_gram`` — for the layers asked for it instead of ``gram``: the second moment of
  the layer's product with its inputs, ``(XWᵀ)ᵀ(XWᵀ) = W XᵀX Wᵀ`` (``out × out``), formed
  in float64 from the inputs (the model's own output is rounded to its precision, which
  would hide the weight's small directions), smaller than ``XᵀX`` when the layer has fewer
  outputs than inputs: SVD-LLM;
* ``abs_sum`` — ``Σ |x|`` per input channel (float64), so ``abs_sum / N`` is the mean
  activation magnitude: ASVD;
* ``fisher`` — ``Σ_batches Σ_j (∂L_b/∂W_ij)²`` (one entry per output row ``i``,
  float64), the empirical Fisher diagonal from one backward pass per batch (a layer
  called several times in a batch adds its calls' gradients before squaring), summed
  along each row: FWSVD. Only the row sums are kept, so a layer costs ``out`` numbers
  here, not ``out × in`` (8 GB in float64 for a 1B-parameter model).
* ``row_fisher``, ``column_fisher`` — ``Σ_b G_b G_bᵀ`` (``out × out``) and ``Σ_b G_bᵀ G_b``
  (``in × in``), float64, from the same per-batch weight gradients ``G_b``: the two
  Kronecker factors of GFWSVD (``fisher`` is the diagonal of ``row_fisher``).

Padding is left out: where a dict batch has an ``attention_mask`` with zeros, only the
real tokens' rows of a layer input laid out ``[batch, tokens, features]`` enter ``gram``,
``output_gram``, ``abs_sum`` and the token count (not in an encoder-decoder, whose decoder
runs on other tokens); FWSVD's default loss does not predict padding, so padding has no
gradient there.

The weight gradient of a batch is formed from the hooked input ``X`` and output
gradient ``G`` as ``GᵀX`` (``out × in`` whatever the layer stores), so the same code
serves ``nn.Linear`` and transformers' ``Conv1D``, and ``.grad`` of the model is left
untouched. Layers that see the very same input tensor (q/k/v, gate/up) share one
``XᵀX`` product per batch.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .. import linalg
from .._progress import progress as progress_bar
from ..errors import SpectrakitError
from ..linalg._prepare import all_finite

Batch = Any
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


@dataclass
class LayerStatistics:
    """What the calibration pass saw at one layer's input (see the module docstring)."""

    tokens: int = 0
    gram: torch.Tensor | None = None
    output_gram: torch.Tensor | None = None
    abs_sum: torch.Tensor | None = None
    fisher: torch.Tensor | None = None
    row_fisher: torch.Tensor | None = None
    column_fisher: torch.Tensor | None = None

    def mean_abs(self) -> torch.Tensor:
        assert self.abs_sum is not None
        return self.abs_sum / max(self.tokens, 1)


@dataclass
class _Input:
    """One layer input of the current batch, with its products, while more layers are to
    read it (q/k/v, gate/up). The tensor is only weakly referenced, so the model can free
    it as usual; a dead reference or a new version (written in place) is a different input."""

    version: int
    products: dict[str, torch.Tensor]
    slot: tuple[str, int]  # (the layer that read it first, how many new inputs it had read before)
    remaining: int | None  # later reads to come, as in the first batch (None: not known)
    tensor: weakref.ref | None = None  # set once the entry is cached

    def holds(self, x: torch.Tensor) -> bool:
        return self.tensor is not None and self.tensor() is x and x._version == self.version


@dataclass
class _Collector:
    layers: dict[str, nn.Module]
    gram: bool
    scale: bool
    fisher: bool
    output_gram: Mapping[str, torch.Tensor] = field(default_factory=dict)  # layer -> its out × in weight
    stats: dict[str, LayerStatistics] = field(default_factory=dict)
    kronecker: bool = False  # also the row and column factors of each batch's weight gradient (gfwsvd)

    @property
    def method(self) -> str:
        """The method the gradient pass serves, for its messages."""
        return "gfwsvd" if self.kronecker else "fwsvd"
    # Products are formed once per input tensor and added to every layer that reads it. Peak
    # memory stays near the accumulators themselves: in the first batch the first reader's
    # float64 accumulator doubles as the cached product (later readers copy it; it is copied
    # before it is written while cached: `shared`); later batches keep a product only until
    # its last reader, counted in the first batch (`followers`), has added it.
    cache: dict[int, _Input] = field(default_factory=dict)
    followers: dict[tuple[str, int], int] = field(default_factory=dict)
    new_inputs: dict[str, int] = field(default_factory=dict)
    shared: set[int] = field(default_factory=set)
    batch_index: int = 0
    batch_number: int = 0  # the batch's number in error messages (its index in the whole set)
    # FWSVD: every parameter is frozen for the pass, and a hooked layer's input that does not
    # require grad yet is made to (a *root*); differentiating the loss w.r.t. the roots then
    # reaches every hooked output downstream, whose gradient hooks form GᵀX, while autograd
    # forms no weight gradient at all and keeps only the roots' gradients
    roots: list[torch.Tensor] = field(default_factory=list)
    # the current batch's real tokens (its attention_mask, when some are padding): the
    # statistics of a layer whose input is laid out [batch, tokens, features] skip the rest
    mask: torch.Tensor | None = None
    # hooked outputs produced before any root exists (their input requires grad through a
    # tensor outside the model's parameters): differentiated directly, next to the roots
    outputs: list[torch.Tensor] = field(default_factory=list)
    # a layer called more than once in a batch (a shared block): its calls' weight gradients
    # are summed into the batch's gradient before it is squared
    calls: dict[str, int] = field(default_factory=dict)
    weight_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    # the output-head stop (see watch_head): layers hooked in the current batch; what the
    # first batch showed (head calls, a targeted layer running after the head); whether to stop
    seen: set[str] = field(default_factory=set)
    head_calls: int = 0
    layer_after_head: bool = False
    stop_at_head: bool = False

    def watch_head(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        """End a statistics-only forward at the output head's input once every targeted
        layer has run in this batch: nothing after the head is needed, and the head is up
        to a third of a small language model's forward (GPT-2: 39 M of 124 M weights).
        Only from the second batch on, and only if in the first one the head ran once and
        no targeted layer ran after it (a model may call its head at every step, or twice
        for a pair of inputs)."""
        if self.stop_at_head and len(self.seen) == len(self.layers):
            raise _HeadReached
        self.head_calls += 1

    def learn_head_stop(self) -> None:
        """After the first batch: stop at the head from now on if that is safe (see watch_head)."""
        self.stop_at_head = self.head_calls == 1 and not self.layer_after_head

    def mark_root(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        x = inputs[0] if inputs else None
        if isinstance(x, torch.Tensor) and x.is_floating_point() and not x.requires_grad and x.grad_fn is None:
            x.requires_grad_(True)
            self.roots.append(x)

    def release_roots(self) -> None:
        for root in self.roots:  # one may be the caller's own batch tensor
            root.requires_grad_(False)
        self.roots.clear()

    def check_input(self, name: str, flat: torch.Tensor) -> None:
        if not all_finite(flat):
            raise SpectrakitError(f"calibration batch {self.batch_number}: the input of layer {name} "
                                  "contains NaN or Inf values")

    def add_products(self, name: str, x: torch.Tensor, flat: torch.Tensor, stats: LayerStatistics) -> None:
        """Add ``x``'s Gram matrix and channel sums to ``stats``, forming them only if no
        other layer has read ``x`` in this batch (see ``cache``)."""
        entry = self.cache.get(id(x))
        first = entry is None or not entry.holds(x)
        if entry is None or first:
            self.check_input(name, flat)
            wide = flat if flat.dtype == torch.float64 else flat.float()
            products = {"gram": linalg.gram(wide)} if self.gram else {}
            if self.scale:
                products["abs_sum"] = wide.abs().sum(dim=0)
            index = self.new_inputs.get(name, 0)
            self.new_inputs[name] = index + 1
            slot = (name, index)
            if self.batch_index == 0:
                self.followers[slot] = 0
            entry = _Input(x._version, products, slot, None if self.batch_index == 0 else self.followers.get(slot))
            if entry.remaining != 0:
                x_key = id(x)
                self.cache[x_key] = entry
                # the model freeing x ends the entry (its id may then be reused)
                def forget(_: weakref.ref, key: int = x_key, entry: _Input = entry) -> None:
                    self.drop(key, entry)
                entry.tensor = weakref.ref(x, forget)
        elif self.batch_index == 0:
            self.followers[entry.slot] += 1
        for key, value in entry.products.items():
            current = getattr(stats, key)
            if current is None:
                current = value.to(torch.float64, copy=not first)
                if first:  # the accumulator is the cached product now (see `cache`)
                    entry.products[key] = current
                    self.shared.add(id(current))
            else:
                if id(current) in self.shared:
                    current = current.clone()
                current.add_(value)
            setattr(stats, key, current)
        if not first and entry.remaining is not None:
            entry.remaining -= 1
            if entry.remaining <= 0:
                self.drop(id(x), entry)

    def real_tokens(self, x: torch.Tensor) -> torch.Tensor | None:
        """Which rows of ``x`` flattened to ``[tokens, features]`` are real tokens (None: all)."""
        if self.mask is None or tuple(x.shape[:-1]) != tuple(self.mask.shape):
            return None
        return self.mask.reshape(-1).to(x.device)

    def add_output_gram(self, name: str, flat: torch.Tensor, stats: LayerStatistics) -> None:
        """Add ``(X Wᵀ)ᵀ(X Wᵀ)`` for the rows of ``flat`` to ``stats``, in float64."""
        product = linalg.gram(flat.double() @ self.output_gram[name].to(flat.device, torch.float64).mT)
        stats.output_gram = product if stats.output_gram is None else stats.output_gram.add_(product)

    def drop(self, key: int, entry: _Input) -> None:
        if self.cache.get(key) is entry:
            del self.cache[key]
            self.shared.difference_update(id(value) for value in entry.products.values())

    def add_fisher(self, name: str, weight_grad: torch.Tensor) -> None:
        """Add the squared rows of one batch's weight gradient to the layer's Fisher."""
        stats = self.stats[name]
        # squared in float64: a float32 square underflows below gradients of 1e-19
        rows = torch.linalg.vector_norm(weight_grad, dim=1, dtype=torch.float64).square_()
        stats.fisher = rows if stats.fisher is None else stats.fisher.add_(rows)
        if self.kronecker:
            wide = weight_grad.double()
            row, column = linalg.gram(wide.mT), linalg.gram(wide)  # G Gᵀ (out × out), Gᵀ G (in × in)
            stats.row_fisher = row if stats.row_fisher is None else stats.row_fisher.add_(row)
            stats.column_fisher = column if stats.column_fisher is None else stats.column_fisher.add_(column)

    def end_batch(self) -> None:
        """Forget the batch that just ran (after the first, decide the head stop)."""
        for name, weight_grad in self.weight_grads.items():
            self.add_fisher(name, weight_grad)
        self.weight_grads.clear()
        self.calls.clear()
        self.mask = None
        if self.batch_index == 0:
            self.learn_head_stop()
        self.seen.clear()
        self.cache.clear()
        self.shared.clear()
        self.new_inputs.clear()
        self.outputs.clear()
        self.release_roots()

    def hook(self, name: str) -> Callable[..., None]:
        def forward_hook(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
            x = inputs[0]
            flat = x.detach().reshape(-1, x.shape[-1])
            real = self.real_tokens(x)
            if real is not None and not self.fisher:  # fwsvd: padding has no gradient (see default_loss)
                flat = flat[real]
            self.seen.add(name)
            self.layer_after_head = self.layer_after_head or self.head_calls > 0
            stats = self.stats.setdefault(name, LayerStatistics())
            stats.tokens += flat.shape[0] if real is None else int(real.sum())
            if name not in self.output_gram and (self.gram or self.scale):
                self.add_products(name, x, flat, stats)  # checks the input once per tensor
            else:
                self.check_input(name, flat)
                if name in self.output_gram:
                    self.add_output_gram(name, flat, stats)
            if self.fisher and output.requires_grad:
                self.calls[name] = self.calls.get(name, 0) + 1
                compute = torch.float64 if flat.dtype == torch.float64 else torch.float32
                saved = flat.to(compute)
                version = saved._version
                if not self.roots:  # its gradient does not come from a root (see `outputs`)
                    self.outputs.append(output)

                def grad_hook(grad: torch.Tensor) -> None:
                    # the weights are frozen, so autograd does not keep X for us and would not
                    # notice the model overwriting it in place after this layer
                    if saved._version != version:
                        raise SpectrakitError(f"{self.method}: the input of layer {name} was modified in place after "
                                              "the layer used it, so its Fisher cannot be formed from it")
                    weight_grad = grad.reshape(-1, grad.shape[-1]).to(compute).T @ saved  # out × in
                    if self.calls[name] == 1:
                        self.add_fisher(name, weight_grad)
                    elif name in self.weight_grads:
                        self.weight_grads[name].add_(weight_grad)
                    else:
                        self.weight_grads[name] = weight_grad

                output.register_hook(grad_hook)

        return forward_hook


class _HeadReached(BaseException):
    """Ends a calibration forward early (a BaseException, so that a model's own
    ``except Exception`` cannot swallow it)."""


@contextlib.contextmanager
def _model_errors_named(index: int, fisher: bool, method: str = "fwsvd") -> Iterator[None]:
    """An error raised inside the model, its loss or autograd (e.g. a model writing in place
    into a tensor FWSVD differentiates) as one line naming the batch."""
    try:
        yield
    except SpectrakitError:
        raise
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        if fisher and isinstance(error, RuntimeError):
            raise SpectrakitError(f"calibration batch {index}: {method} cannot differentiate this model: "
                                  f"{first or type(error).__name__}") from None
        raise SpectrakitError(f"calibration batch {index}: the model raised {type(error).__name__}"
                              f"{': ' + first if first else ''}") from None


def _check_finite(batch: Batch, index: int) -> None:
    tensors = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else [batch]
    for value in tensors:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not all_finite(value):
            raise SpectrakitError(f"calibration batch {index} contains NaN or Inf values")


def _padding_mask(model: nn.Module, batch: Batch) -> torch.Tensor | None:
    """A dict batch's ``attention_mask`` as booleans, when some of its tokens are padding
    (an encoder-decoder's decoder runs on other tokens, so there it is not used)."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or bool(mask.all()):
        return None
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    return mask != 0


def run_model(model: nn.Module, batch: Batch) -> Any:
    """Call ``model`` on one calibration batch: a dict is passed as keywords, a tuple or
    list as positional arguments, an integer tensor as ``input_ids`` to a Hugging Face
    model, any other tensor as the only argument."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(*batch)
    if isinstance(batch, torch.Tensor):
        config = getattr(model, "config", None)
        if not batch.is_floating_point() and config is not None:
            if getattr(config, "is_encoder_decoder", False):
                raise SpectrakitError(f"token ids alone cannot drive the encoder-decoder {type(model).__name__}: "
                                      "pass calibration batches as dicts of its arguments, e.g. "
                                      "{'input_ids': ids, 'labels': ids}")
            return model(input_ids=batch)
        return model(batch)
    raise SpectrakitError(f"calibration batches must be tensors, tuples or dicts, got {type(batch).__name__}")


def default_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The loss FWSVD differentiates when no ``loss_fn`` is given: the model's own ``.loss``
    for a dict batch with ``labels``; next-token cross-entropy for a token-id batch of a
    language model (logits ``[batch, seq, vocab]``)."""
    output = run_model(model, batch)
    loss = getattr(output, "loss", None)
    if loss is not None:
        return loss
    logits = getattr(output, "logits", output)
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch
    if isinstance(ids, (list, tuple)) and len(ids) == 1:  # e.g. a DataLoader over TensorDataset(ids)
        ids = ids[0]
    if (isinstance(logits, torch.Tensor) and isinstance(ids, torch.Tensor) and not ids.is_floating_point()
            and logits.ndim == 3 and logits.shape[:2] == ids.shape and ids.shape[1] > 1):
        if not _predicts_next_token(model):
            raise SpectrakitError(f"the default calibration loss: {type(model).__name__} does not predict the next "
                                  "token; pass batches with labels, or loss_fn=lambda model, batch: ...")
        targets = ids[:, 1:]
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        if isinstance(mask, torch.Tensor) and mask.shape == ids.shape:
            # padding is neither a target nor a context a target is predicted from (left padding)
            targets = targets.masked_fill((mask[:, 1:] == 0) | (mask[:, :-1] == 0), -100)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                               ignore_index=-100)
    raise SpectrakitError("no default calibration loss (fwsvd, gfwsvd, allocation='sensitivity' and lora_update "
                          "need one): pass loss_fn=lambda model, batch: ... (the calibration batches are not token "
                          "ids of a language model)")


def _predicts_next_token(model: nn.Module) -> bool:
    """False for a Hugging Face model that cannot generate (a masked LM such as BERT)."""
    can_generate = getattr(model, "can_generate", None)
    if getattr(model, "config", None) is None or not callable(can_generate):
        return True
    try:
        return bool(can_generate())
    except Exception:  # an older or unusual model class
        return True


def collect_statistics(model: nn.Module, layers: dict[str, nn.Module], calibration: Iterable[Batch], *,
                       gram: bool = False, scale: bool = False, fisher: bool = False,
                       output_gram: Mapping[str, torch.Tensor] | None = None, loss_fn: LossFn | None = None,
                       head: nn.Module | None = None, progress: bool = False,
                       kronecker: bool = False, numbers: Sequence[int] | None = None) -> dict[str, LayerStatistics]:
    """Run ``calibration`` through ``model`` and return the statistics of each of ``layers``.

    ``output_gram``: the layers to gather ``output_gram`` for instead of ``gram``, each
    with its ``out × in`` weight (for a method that needs neither their input's ``XᵀX``
    nor its channel sums).

    ``head``: the model's output head, if it is not among ``layers``. Without ``fisher``
    (which needs the loss) every forward after the first then stops at the head's input as
    soon as every layer in ``layers`` has run in that batch — provided that in the first
    batch the head ran exactly once and no layer in ``layers`` ran after it. (A model
    whose later batches call the head or the layers in another order than its first
    would lose statistics; none of the usual architectures does.) ``progress``: a progress
    bar over the batches. ``kronecker`` (with ``fisher``): also ``row_fisher`` and
    ``column_fisher``, the Kronecker factors of GFWSVD. ``numbers``: each batch's number in
    error messages (default 0, 1, …; a torchrun rank's share keeps the numbers of the whole set).

    Raises :class:`SpectrakitError` for an empty calibration set, NaN/Inf in a batch or
    in a layer's input, and (FWSVD) a model whose loss cannot be derived from the batch.
    """
    if calibration is None:
        raise SpectrakitError("calibration=None: this method needs calibration batches")
    if isinstance(calibration, (torch.Tensor, Mapping)):
        calibration = [calibration]
    if not isinstance(calibration, Iterable):
        raise SpectrakitError(f"calibration must be an iterable of batches (a list, a DataLoader, …), "
                              f"got {type(calibration).__name__}")
    total = len(calibration) if isinstance(calibration, Sized) else None
    calibration = progress_bar(calibration, total=total, desc="calibration", enabled=progress, unit="batch")
    fisher = fisher or kronecker
    collector = _Collector(layers, gram=gram, scale=scale, fisher=fisher, output_gram=output_gram or {},
                           kronecker=kronecker)
    handles = [module.register_forward_hook(collector.hook(name)) for name, module in layers.items()]
    if fisher:
        handles += [module.register_forward_pre_hook(collector.mark_root) for module in layers.values()]
    elif head is not None and all(head is not module for module in layers.values()):
        handles.append(head.register_forward_pre_hook(collector.watch_head))
    was_training = model.training
    model.eval()
    # FWSVD freezes every parameter for the pass (see _Collector.roots); all requires_grad
    # flags and .grad fields are put back afterwards.
    flags = {id(p): (p, p.requires_grad, p.grad) for p in model.parameters()}
    try:
        if fisher:
            for p, _, _ in flags.values():
                p.requires_grad_(False)
        loss_fn = loss_fn or default_loss
        for position, batch in enumerate(calibration):
            index = position if numbers is None else numbers[position]
            collector.batch_index, collector.batch_number = position, index
            _check_finite(batch, index)
            collector.mask = _padding_mask(model, batch)
            if fisher:
                with torch.enable_grad(), _model_errors_named(index, fisher=True, method=collector.method):
                    loss = loss_fn(model, batch)
                    if not bool(torch.isfinite(loss)):
                        raise SpectrakitError(f"calibration batch {index}: the loss is {float(loss)}")
                    if not loss.requires_grad:
                        raise SpectrakitError(f"calibration batch {index}: the {collector.method} loss does not depend "
                                              "on the targeted layers (computed under no_grad, or detached?)")
                    differentiate = collector.roots + collector.outputs
                    if differentiate:  # none: no targeted layer ran (reported below)
                        torch.autograd.grad(loss, differentiate, allow_unused=True)
            else:
                with torch.no_grad(), contextlib.suppress(_HeadReached), _model_errors_named(index, fisher=False):
                    run_model(model, batch)
            collector.end_batch()
    finally:
        collector.release_roots()
        for handle in handles:
            handle.remove()
        for p, requires_grad, grad in flags.values():
            p.requires_grad_(requires_grad)
            p.grad = grad
        model.train(was_training)
    if collector.batch_index == 0 and not collector.stats:
        raise SpectrakitError("calibration yielded no batches, or none reached the targeted layers")
    missing = [name for name in layers if name not in collector.stats]
    if missing:
        raise SpectrakitError(f"calibration never reached layer {missing[0]} (is it used in forward?)")
    return collector.stats
