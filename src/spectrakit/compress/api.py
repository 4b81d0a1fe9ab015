"""``compress(model, method=…, ratio=…)``: replace linear layers by low-rank ones, in place.

Steps: select the target layers (through :func:`spectrakit.weights.iter_matrices`, which
already presents transformers' ``Conv1D`` as ``out × in``) and check their weights;
gather the calibration statistics the method needs in one hooked pass; take one SVD per
layer of the method's transformed weight; allocate ranks under the budget; swap in a
:class:`LowRankLinear` wherever it holds fewer weights than the dense layer.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, NoReturn

import torch
from torch import nn

from .. import weights as spectrakit_weights
from .._distributed import distributed_group
from .._progress import progress as progress_bar
from .._targets import check_weight, layer_weight, module_sites, replace_module, select_targets
from ..cache import SpectrumCache, as_cache
from ..errors import SpectrakitError
from ..linalg.svd import METHODS as SVD_METHODS
from ..weights.record import matches_any
from .allocation import LayerShape, allocate, budget_ratio, check_budget
from .asvd import ActivationAwareSVD
from .base import CompressionWarning, Method
from .calibration import LossFn, collect_statistics, default_loss
from .distributed import collect_shared, layer_owners, shared_factors, shared_spectra
from .fwsvd import FisherWeightedSVD
from .gfwsvd import GeneralizedFisherWeightedSVD
from .lora_update import sequential_update
from .lowrank import LowRankLinear, low_rank_parameters
from .sensitivity import CANDIDATES, sensitivity_ranks
from .structured import STRUCTURES
from .svd import PlainSVD
from .svd_llm import TruncationAwareSVD
from .svd_llm_v2 import LossOptimizedSVD

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in
                                    (PlainSVD, ActivationAwareSVD, FisherWeightedSVD, GeneralizedFisherWeightedSVD,
                                     TruncationAwareSVD, LossOptimizedSVD)}


@dataclass
class LayerReport:
    """One targeted layer: its shape, the rank kept (``full_rank`` when left dense),
    whether it was replaced, the weights before/after and the method's predicted loss
    (sum of the dropped ``σᵢ²``).

    Attributes:
        out_features: the layer's output size.
        in_features: its input size.
        rank: the rank kept (``full_rank`` when the layer stayed dense).
        full_rank: ``min(out_features, in_features)``.
        replaced: whether the layer was factorized.
        parameters_before: the layer's weights before.
        parameters_after: its weights after (both factors when replaced).
        truncation_loss: the method's predicted added loss, the sum of the dropped ``σᵢ²``
            of the (whitened or weighted) matrix.
        relative_loss: ``truncation_loss`` over the sum of all ``σᵢ²``.
    """

    out_features: int
    in_features: int
    rank: int
    full_rank: int
    replaced: bool
    parameters_before: int
    parameters_after: int
    truncation_loss: float
    relative_loss: float


@dataclass
class CompressionReport:
    """What :func:`compress` did. ``parameters_*`` count the whole model (each tied
    tensor once); ``target_parameters_*`` only the targeted weight matrices.

    Attributes:
        method: the compression method.
        allocation: how ranks were allocated (``uniform``, ``global``, …).
        budget: the budget asked for (``ratio``, ``rank`` or ``energy``).
        parameters_before: the model's parameters before.
        parameters_after: the model's parameters after.
        target_parameters_before: the targeted weight matrices' parameters before.
        target_parameters_after: the same after compression.
        layers: one :class:`LayerReport` per targeted layer, by name.
        calibration_tokens: tokens the calibration statistics were formed from.
        seconds: the whole call's wall time.
        calibration_seconds: the part of it spent on calibration.
        lora_loss_before: the calibration loss before ``lora_update=True`` (``None`` without it).
        lora_loss_after: the calibration loss after it.
        lora_seconds: the time the low-rank update took.
    """

    method: str
    allocation: str
    budget: dict[str, Any]
    parameters_before: int
    parameters_after: int
    target_parameters_before: int
    target_parameters_after: int
    layers: dict[str, LayerReport] = field(default_factory=dict)
    calibration_tokens: int = 0
    seconds: float = 0.0
    calibration_seconds: float = 0.0
    lora_loss_before: float | None = None  # calibration loss before / after lora_update=True
    lora_loss_after: float | None = None
    lora_seconds: float = 0.0

    @property
    def ratio(self) -> float:
        """Fraction of the targeted weights removed."""
        return 1 - self.target_parameters_after / max(self.target_parameters_before, 1)

    @property
    def ranks(self) -> dict[str, int]:
        return {name: layer.rank for name, layer in self.layers.items()}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio"] = self.ratio
        return data

    def __str__(self) -> str:
        replaced = sum(layer.replaced for layer in self.layers.values())
        return (f"{self.method} ({self.allocation}): {self.parameters_before:,} -> {self.parameters_after:,} "
                f"parameters; targeted weights -{self.ratio:.1%}; {replaced}/{len(self.layers)} layers "
                f"factorized; {self.seconds:.2f} s")


def count_parameters(model: nn.Module) -> int:
    """Parameters of ``model``, each tied tensor counted once."""
    return sum(p.numel() for p in model.parameters())


def _output_head(model: nn.Module) -> nn.Module | None:
    """A Hugging Face model's output head (``get_output_embeddings()``), if it has one."""
    get_output = getattr(model, "get_output_embeddings", None)
    if not callable(get_output):
        return None
    try:
        head = get_output()
    except Exception:  # some models raise NotImplementedError here
        return None
    return head if isinstance(head, nn.Module) else None


def _output_weight_ids(model: nn.Module) -> set[int]:
    """Weights ``targets="all-linear"`` leaves alone: the output head and embedding-tied ones."""
    skip: set[int] = set()
    head = _output_head(model)
    if head is not None and isinstance(getattr(head, "weight", None), torch.Tensor):
        skip.add(id(head.weight))
    skip.update(id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)))
    return skip


def find_layers(model: nn.Module, targets: str | Iterable[str] = "all-linear") -> dict[str, nn.Module]:
    """The ``nn.Linear`` / ``Conv1D`` layers that ``targets`` selects, by module name.

    ``"all-linear"``: every one but the output head and layers whose weight is tied to an
    embedding or to another layer. Otherwise name patterns (substring, or shell pattern
    with ``*?[``). A pattern that matches no linear layer, or only something that is not a
    linear weight matrix (a norm, an embedding, a conv kernel, an already compressed layer)
    or a tied weight, is an error. One module registered under several names (a layer
    reused) is one target, under its first name; any of its names selects it.

    Args:
        model: the model to search.
        targets: ``"all-linear"`` or name patterns (see above).
    """
    if not isinstance(model, nn.Module):
        raise SpectrakitError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    linear: dict[str, nn.Module] = {}
    tied: dict[str, tuple[str, ...]] = {}  # a layer -> its weight's names in *other* modules
    names: dict[str, list[str]] = {}  # a layer -> every name of that module
    alias_of: dict[str, str] = {}  # a module reached under a tied weight's second name -> first name
    for record in spectrakit_weights.iter_matrices(model, gates=False):  # real parameter names
        module_name = record.name.rpartition(".")[0]
        module = model.get_submodule(module_name)
        owners = {alias: alias.rpartition(".")[0] for alias in record.aliases}
        reused = [owner for owner in owners.values() if model.get_submodule(owner) is module]
        others = tuple(alias for alias, owner in owners.items() if owner not in reused)
        alias_of.update((owners[alias], record.name) for alias in others)
        if record.kind != "linear":
            continue
        linear[module_name] = module
        names[module_name] = [module_name, *reused]
        tied[module_name] = others
    skip = _output_weight_ids(model)

    def miss(pattern: str) -> NoReturn:
        aliases = [n for n in alias_of if matches_any([n, n + ".weight"], [pattern])]
        if aliases:
            raise SpectrakitError(f"target {aliases[0]}.weight is tied to {alias_of[aliases[0]]}; "
                                  "compressing it would untie them")
        other = [n for n, _ in model.named_parameters() if matches_any([n, n.rpartition(".")[0]], [pattern])]
        if other:
            raise SpectrakitError(f"target {pattern!r} matches {other[0]}, which is not the weight matrix "
                                  "of an nn.Linear or Conv1D layer")
        raise SpectrakitError(f"target {pattern!r} matches no layer of the model")

    def untied(name: str) -> None:
        if tied[name]:
            raise SpectrakitError(f"target {name}.weight is tied to {tied[name][0]}; compressing it "
                                  "would untie them")

    return select_targets(linear, targets, verb="compress", on_miss=miss, check_hit=untied,
                          matches=lambda name, pattern: matches_any(
                              [form for other in names[name] for form in (other, other + ".weight")], [pattern]),
                          all_linear=lambda layers: {n: m for n, m in layers.items()
                                                     if id(m.weight) not in skip and not tied[n]})


def _canonical_weight(name: str, layer: nn.Module) -> torch.Tensor:
    """``out × in`` weight of a Linear or Conv1D, checked: real data, floating point, finite."""
    check_weight(name, layer)
    # iter_matrices knows each layer's storage layout (Conv1D is in × out): reuse it
    (record,) = [r for r in spectrakit_weights.iter_matrices(layer) if r.name == "weight"]
    return record.matrix().detach()


def get_method(method: str, options: dict[str, Any]) -> Method:
    """The :class:`Method` named ``method``, built with ``options`` (one clear line if either is bad)."""
    if method not in METHODS:
        raise SpectrakitError(f"method={method!r} is not one of {', '.join([*METHODS, 'modegpt', *STRUCTURES])}")
    try:
        return METHODS[method](**options)
    except TypeError as error:
        raise SpectrakitError(f"method {method!r}: bad option ({error})") from None


def compress(model: nn.Module | str | os.PathLike[str], method: str = "svd-llm", *, ratio: float | None = None,
             rank: int | None = None,
             energy: float | None = None, calibration: Iterable[Any] | None = None, allocation: str | None = None,
             targets: str | Iterable[str] = "all-linear", loss_fn: LossFn | None = None,
             only_if_smaller: bool = True, svd_method: str = "auto", progress: bool = False,
             lora_update: bool = False, lora_lr: float = 1e-4, lora_epochs: int = 2,
             sequential: bool = False, low_memory: bool = False, out: str | os.PathLike[str] | None = None,
             search_batches: int | None = None, distributed: bool | None = None,
             cache: SpectrumCache | str | os.PathLike[str] | None = None, **options: Any) -> CompressionReport:
    """Compress ``model``'s linear layers in place with a truncated-SVD ``method``.

    Args:
        model: any module with ``nn.Linear`` or transformers ``Conv1D`` layers; or, with
            ``low_memory=True``, a Hugging Face checkpoint folder (:mod:`spectrakit.compress.low_memory`).
        method: ``"svd"``, ``"asvd"``, ``"fwsvd"``, ``"gfwsvd"``, ``"svd-llm"`` or ``"svd-llm-v2"``;
            ``"monarch"``/``"btt"`` (:mod:`~spectrakit.compress.structured_compress`); ``"modegpt"``
            (MLP, Q·K and V·O pairs made narrower, :mod:`~spectrakit.compress.modegpt`).
        ratio: fraction of the targeted weights' parameters to remove, in (0, 1).
        rank: one rank for every layer (alternative to ``ratio``).
        energy: keep this fraction of each layer's ``Σσᵢ²`` (alternative to ``ratio``).
        calibration: iterable of batches (token-id tensors, input tensors, tuples or dicts
            of model arguments); needed by every method but ``svd``, by ``allocation="sensitivity"``
            and by ``lora_update``.
        allocation: ``"uniform"``, ``"global"``, ``"heterogeneous"`` (SVD-LLM V2) or ``"sensitivity"``
            (ASVD's search; see :mod:`spectrakit.compress.allocation`); ``None``: the method's own
            (``"heterogeneous"`` for svd-llm-v2, ``"uniform"`` otherwise).
        targets: ``"all-linear"`` (all but the output head) or layer-name patterns.
        loss_fn: ``loss_fn(model, batch) -> scalar`` for ``fwsvd``/``gfwsvd``, the sensitivity
            search and ``lora_update``, when the model is not a language model fed token ids.
        only_if_smaller: keep a layer dense where its factors would not save parameters;
            ``False`` factorizes every target (used to check full-rank exactness).
        svd_method: ``"auto"`` (on the CPU a float64 Gram eigensolve, see
            :meth:`Method.spectrum`), or a method of :func:`spectrakit.linalg.svd`.
        progress: show progress bars over the calibration batches and the layers.
        lora_update: after truncation, fine-tune each compressed layer's ``up`` then ``down`` on
            the calibration batches (:mod:`spectrakit.compress.lora_update`).
        lora_lr, lora_epochs: Adam's learning rate and the passes over the batches per side.
        search_batches: ``allocation="sensitivity"`` measures the loss on this many of the
            calibration batches (default all).
        sequential: compress the decoder blocks in order, each calibrated on the outputs of
            the compressed blocks before it (:mod:`spectrakit.compress.blockwise`; uniform
            allocation; svd, asvd, svd-llm, svd-llm-v2).
        low_memory: ``model`` is a checkpoint folder, compressed block by block into ``out``
            with one block in memory at a time; the same result as ``sequential=True``.
        out: the output folder of ``low_memory=True`` (``load_compressed(out)`` reads it).
        distributed: under ``torchrun`` (``None``, the default, when ``WORLD_SIZE > 1``; ``True``
            to insist) each rank calibrates on its share of the batches and decomposes its share
            of the layers, and every rank ends with the same model
            (:mod:`spectrakit.compress.distributed`); ``False``: one process.
        cache: a :class:`~spectrakit.SpectrumCache` or its folder. Only ``method="svd"`` uses it:
            each layer's spectrum (the singular values and vectors :meth:`Method.spectrum`
            computes, keyed by the weight's bytes, dtype, device and ``svd_method``) is read from
            it when this very weight was decomposed before, else computed and written there, so
            a cached run gives the compressed weights of the run that filled it, bit for bit.
            The other methods decompose a matrix formed from the calibration (whitened,
            activation-scaled, Fisher-weighted), which the cache does not key on: they do not
            use it, and say so once with a :class:`CompressionWarning`. ``None``: the cache of
            an enclosing :func:`spectrakit.cache.use_cache` block, if any (plain svd only).
        options: method options (``alpha`` for asvd; ``damping``, ``max_condition`` for svd-llm and
            gfwsvd; ``factors`` for gfwsvd).

    Returns:
        a :class:`CompressionReport` (parameters before and after, rank of each layer).

    >>> import torch, spectrakit as sk
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    >>> report = sk.compress(model, method="svd", ratio=0.5)
    >>> report.ranks, report.parameters_after == sum(p.numel() for p in model.parameters())
    ({'0': 16, '2': 16}, True)
    """
    start = time.perf_counter()
    cache = as_cache(cache)
    if cache is not None and method != PlainSVD.name:
        warnings.warn(f"cache={str(cache.path)!r}: method {method!r} decomposes a matrix formed from the "
                      "calibration, which the spectrum cache does not key on; only method 'svd' reads and "
                      "writes it", CompressionWarning, stacklevel=2)
        cache = None
    if sequential or low_memory or out is not None or isinstance(model, (str, os.PathLike)):
        from .low_memory import dispatch  # block by block (it builds on this module)

        return dispatch(model, method, sequential=sequential, low_memory=low_memory, out=out, ratio=ratio, rank=rank,
                        energy=energy, calibration=calibration, allocation=allocation, targets=targets,
                        only_if_smaller=only_if_smaller, svd_method=svd_method, progress=progress,
                        lora_update=lora_update, options=options, cache=cache, distributed=distributed)
    if not isinstance(model, nn.Module):
        raise SpectrakitError(f"model: expected a torch.nn.Module or a checkpoint folder, got {type(model).__name__}")
    if (method == "modegpt" or method in STRUCTURES) and (lora_update or search_batches is not None):
        # their layers are not two factors, and they allocate no ranks
        raise SpectrakitError(f"method {method!r}: lora_update and search_batches apply to the low-rank methods "
                              f"({', '.join(METHODS)})")
    if method == "modegpt":
        from .modegpt import compress_modegpt  # it builds on this module

        return compress_modegpt(model, ratio=ratio, rank=rank, energy=energy, calibration=calibration,
                                allocation=allocation, start=start, progress=progress, **options)
    if method in STRUCTURES:
        from .structured_compress import compress_structured  # it builds on this module

        return compress_structured(model, method, ratio=ratio, rank=rank, energy=energy, allocation=allocation,
                                    targets=targets, only_if_smaller=only_if_smaller, start=start, **options)
    solver = get_method(method, options)
    solver.cache = cache  # plain svd reads it (else the active cache); the other methods have none
    allocation = solver.default_allocation if allocation is None else allocation
    check_budget(ratio, rank, energy, allocation)
    ratio, energy = (None if v is None else float(v) for v in (ratio, energy))
    rank = None if rank is None else int(rank)
    if svd_method not in SVD_METHODS:
        raise SpectrakitError(f"svd_method={svd_method!r} is not one of {', '.join(SVD_METHODS)}")
    reuse = allocation == "sensitivity" or lora_update  # the batches are run through more than once
    if reuse:
        if calibration is None:
            raise SpectrakitError(f"{'lora_update' if lora_update else 'allocation=sensitivity'} needs "
                                  "calibration=batches (the loss is measured on them)")
        if isinstance(calibration, (torch.Tensor, dict)):
            calibration = [calibration]
        if not isinstance(calibration, Iterable):
            raise SpectrakitError(f"calibration must be an iterable of batches (a list, a DataLoader, …), "
                                  f"got {type(calibration).__name__}")
        calibration = list(calibration)
        if not calibration:
            raise SpectrakitError("calibration yielded no batches")
    layers = find_layers(model, targets)
    matrices = {name: _canonical_weight(name, layer) for name, layer in layers.items()}
    parameters_before = count_parameters(model)
    group = distributed_group(distributed)
    owner_of = layer_owners(matrices, group[1]) if group is not None else {}

    statistics: dict[str, Any] = {}
    tokens = 0
    calibration_start = time.perf_counter()
    if solver.needs:
        if calibration is None:
            raise SpectrakitError(f"method {method!r} needs calibration=batches (inputs the model is run on)")
        output_gram = {name: W for name, W in matrices.items() if solver.uses_output_gram(W, svd_method)}
        needs: dict[str, Any] = {key: key in solver.needs for key in ("gram", "scale", "fisher", "kronecker")}
        collect = collect_statistics if group is None else partial(collect_shared, owner_of=owner_of)
        statistics = collect(model, layers, calibration, output_gram=output_gram, loss_fn=loss_fn,
                             head=_output_head(model), progress=progress and (group is None or group[0] == 0),
                             **needs)
        tokens = max((s.tokens for s in statistics.values()), default=0)
    calibration_seconds = time.perf_counter() - calibration_start

    spectra = {}
    if group is not None:  # each rank its share of the layers, then every rank all σ
        spectra = shared_spectra(solver, matrices, statistics, owner_of, svd_method=svd_method,
                                 full=allocation == "sensitivity", progress=progress and group[0] == 0)
    bar = progress_bar(list(layers), total=len(layers), desc=f"compress {method}",
                       enabled=progress and group is None, unit="layer")
    for name in bar if group is None else ():
        # each layer's statistics (an in × in Gram for svd-llm) are let go as soon as it is decomposed
        spectra[name] = solver.spectrum(name, matrices[name], statistics.pop(name, None), svd_method=svd_method)
    for message in solver.warnings():
        warnings.warn(message, CompressionWarning, stacklevel=2)
    shapes = {name: LayerShape(matrices[name].shape[0], matrices[name].shape[1], spectra[name].losses)
              for name in layers}
    sites = module_sites(model)
    if allocation == "sensitivity":
        assert isinstance(calibration, list)
        dense = sum(shape.dense for shape in shapes.values())
        budget_weights = math.floor((1 - budget_ratio(shapes, ratio, rank, energy, only_if_smaller)) * dense)
        searched = calibration[:search_batches] if search_batches else calibration
        ranks = sensitivity_ranks(model, layers, sites, spectra, shapes, searched, loss_fn or default_loss,
                                  budget_weights, CANDIDATES, only_if_smaller)
    else:
        ranks = allocate(shapes, ratio=ratio, rank=rank, energy=energy, allocation=allocation,
                         only_if_smaller=only_if_smaller)

    report_layers: dict[str, LayerReport] = {}
    replaced = {name: ranks[name] for name, shape in shapes.items()
                if not only_if_smaller or shape.cost(ranks[name]) < shape.dense}
    shared = {} if group is None else shared_factors(  # each owner its layers' factors, sent to all
        spectra, replaced, {name: layer_weight(layers[name]).dtype for name in replaced}, owner_of)
    for name, layer in layers.items():
        shape, spectrum, k = shapes[name], spectra.pop(name), ranks[name]
        replace = name in replaced
        if replace:
            weight = layer_weight(layer)
            up, down = shared[name] if name in shared else spectrum.factors(k, dtype=weight.dtype)
            bias = getattr(layer, "bias", None)
            new = LowRankLinear.from_factors(up, down, bias.detach() if bias is not None else None, method=method,
                                             dtype=weight.dtype)
            replace_module(model, sites[id(layer)], new.to(weight.device))
        losses = shape.losses
        dropped = float(losses[k:].sum()) if replace else 0.0
        report_layers[name] = LayerReport(
            out_features=shape.out_features, in_features=shape.in_features,
            rank=k if replace else shape.full_rank, full_rank=shape.full_rank, replaced=replace,
            parameters_before=shape.dense,
            parameters_after=low_rank_parameters(shape.in_features, shape.out_features, k) if replace else shape.dense,
            truncation_loss=dropped, relative_loss=dropped / max(float(losses.sum()), 1e-300))

    target_before = sum(layer.parameters_before for layer in report_layers.values())
    target_after = sum(layer.parameters_after for layer in report_layers.values())
    removed = 1 - target_after / max(target_before, 1)
    if ratio is not None and removed < ratio - 0.005:
        warnings.warn(f"ratio={ratio} is out of reach: every layer keeps at least rank 1, so only {removed:.1%} "
                      "of the targeted weights were removed", CompressionWarning, stacklevel=2)
    lora: dict[str, Any] = {}
    if lora_update:
        assert isinstance(calibration, list)
        lora_start = time.perf_counter()
        compressed = [m for m in dict.fromkeys(model.modules()) if isinstance(m, LowRankLinear)
                      and any(m is model.get_submodule(name) for name, r in report_layers.items() if r.replaced)]
        before, after = sequential_update(model, compressed, calibration, loss_fn or default_loss, lora_lr,
                                          lora_epochs)
        lora = {"lora_loss_before": before, "lora_loss_after": after,
                "lora_seconds": time.perf_counter() - lora_start}
        options = {**options, "lora_update": True, "lora_lr": lora_lr, "lora_epochs": lora_epochs}
    budget = {"ratio": ratio, "rank": rank, "energy": energy, **options}
    return CompressionReport(
        method=method, allocation=allocation, budget={k: v for k, v in budget.items() if v is not None},
        parameters_before=parameters_before, parameters_after=parameters_before - target_before + target_after,
        target_parameters_before=target_before, target_parameters_after=target_after, layers=report_layers,
        calibration_tokens=tokens, seconds=time.perf_counter() - start, calibration_seconds=calibration_seconds,
        **lora)

