"""``SpectralMonitor``: spectral metrics of a model's weights while it trains.

It measures every ``every`` steps with estimators cheap enough to leave on:

* ``sigma_max`` — power iteration whose vectors persist across measurements, so
  each measurement costs ``power_iters`` matrix–vector pairs per weight;
* ``frobenius_norm`` and ``stable_rank = ‖W‖_F² / σ₁²`` — from the same σ₁;
* ``topk_energy`` — the share of ‖W‖_F² in the top ``k`` singular values, from a
  seeded randomized top-``k`` SVD;
* ``effective_rank`` — exp of the spectral entropy; needs the full spectrum (Gram
  + eigvalsh), the one costly choice;
* ``intruders`` — intruder dimensions against the weights at the start of training
  (copied when the monitor is built), the count :func:`~spectrakit.compare` gives;
* ``alpha`` — the ESD power-law exponent, as :func:`~spectrakit.analyze` computes it;
* ``sharpness`` (``λ_max`` of the loss Hessian) and ``alignment`` (share of the gradient
  in the top-``alignment_k`` Hessian eigenspace), of the loss on fixed ``batches``, every
  ``curvature_every`` steps (logged as ``loss/sharpness``, ``loss/alignment``; NaN between).

See :mod:`spectrakit.analyze.training_metrics` for the definitions.

Plain loop::

    monitor = sk.SpectralMonitor(model, every=50, csv_path="spectra.csv")
    for step, batch in enumerate(loader):
        ...; optimizer.step()
        monitor.step(step)

With a ``transformers.Trainer``: ``Trainer(..., callbacks=[monitor.callback()])``.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .. import linalg
from .._atomic import atomic_write
from ..errors import SpectrakitError
from ..weights import iter_matrices
from .metrics import effective_rank
from .training_metrics import curvature_metrics, intruder_count, spectrum_alpha

METRICS = ("sigma_max", "frobenius_norm", "stable_rank", "topk_energy", "effective_rank", "intruders", "alpha",
           "sharpness", "alignment")
LOSS_METRICS = ("sharpness", "alignment")
DEFAULT_METRICS = ("sigma_max", "stable_rank")
_WARMUP_ITERS = 50


class SpectralMonitor:
    """Track per-matrix spectral metrics every ``every`` steps; log to CSV / TensorBoard.

    Args:
        model: the module being trained (its weights are read live, never copied).
        every: measure when ``step % every == 0``.
        metrics: any of ``sigma_max``, ``frobenius_norm``, ``stable_rank``,
            ``topk_energy``, ``effective_rank``, ``intruders``, ``alpha`` (per matrix) and
            ``sharpness``, ``alignment`` (of the loss; need ``loss_fn`` and ``batches``).
        include, exclude: name patterns selecting the matrices.
        csv_path: rewritten atomically after each measurement.
        tensorboard_dir: also log scalars there (needs ``tensorboard``).
        power_iters: power iterations per measurement (vectors persist between them).
        k: rank for ``topk_energy``.
        loss_fn, batches, forward: the loss for ``sharpness``/``alignment``, as for
            :func:`~spectrakit.analyze.hessian` (the batches are fixed, read once).
        curvature_every: measure the loss metrics every this many steps (default ``every``).
        curvature_params: parameters of the Hessian (default: all trainable).
        alignment_k: dimension of the eigenspace for ``alignment``.
        intruder_k, epsilon: ``k`` and ``epsilon`` of the intruder count (as in ``compare``).

    >>> import torch, spectrakit as sk
    >>> model = torch.nn.Linear(32, 16)
    >>> monitor = sk.SpectralMonitor(model, every=1)
    >>> for step in range(30):
    ...     row = monitor.step(step)
    >>> exact = float(torch.linalg.matrix_norm(model.weight.detach(), 2))
    >>> abs(monitor.history[-1]["weight/sigma_max"] - exact) < 1e-4 * exact
    True
    """

    def __init__(self, model: nn.Module, every: int = 100, metrics: Sequence[str] = DEFAULT_METRICS, *,
                 include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None,
                 csv_path: str | os.PathLike | None = None, tensorboard_dir: str | os.PathLike | None = None,
                 power_iters: int = 2, k: int = 8, loss_fn: Any = None, batches: Any = None, forward: Any = None,
                 curvature_every: int | None = None, curvature_params: Any = None, alignment_k: int = 5,
                 intruder_k: int = 10, epsilon: float = 0.5) -> None:
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise SpectrakitError(f"metrics: unknown {', '.join(unknown)}; choose from {', '.join(METRICS)}")
        if every < 1:
            raise SpectrakitError(f"every={every} must be ≥ 1")
        self.every, self.metrics, self.k = every, tuple(metrics), k
        self.records = [r for r in iter_matrices(model, include=include, exclude=exclude)
                        if r.dtype.is_floating_point and not r.is_meta]
        if not self.records:
            raise SpectrakitError("SpectralMonitor: no floating-point weight matrix matched")
        self.power_iters = power_iters
        self._power = {r.name: linalg.PowerIteration(n_iter=power_iters, seed=i) for i, r in enumerate(self.records)}
        self.history: list[dict[str, Any]] = []
        self.model, self.intruder_k, self.epsilon, self.alignment_k = model, intruder_k, epsilon, alignment_k
        self.loss_metrics = tuple(m for m in self.metrics if m in LOSS_METRICS)
        if self.loss_metrics and (loss_fn is None or batches is None):
            raise SpectrakitError(f"metrics {', '.join(self.loss_metrics)} need loss_fn and batches")
        self.loss_fn, self.forward, self.curvature_params = loss_fn, forward, curvature_params
        self.batches = list(batches) if batches is not None else []
        self.curvature_every = curvature_every or every
        if self.curvature_every < 1:
            raise SpectrakitError(f"curvature_every={curvature_every} must be ≥ 1")
        # the start of training, for the intruder count: a copy, since the weights change in place
        self._start = ({r.name: r.matrix().detach().clone() for r in self.records}
                       if "intruders" in self.metrics else {})
        self.csv_path = csv_path
        self._writer = self._tensorboard(tensorboard_dir) if tensorboard_dir else None

    @staticmethod
    def _tensorboard(log_dir: str | os.PathLike) -> Any:  # a SummaryWriter (tensorboard is optional)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise SpectrakitError("tensorboard_dir needs tensorboard: pip install tensorboard") from error
        return SummaryWriter(str(log_dir))

    def measure(self) -> dict[str, float]:
        """Measure every selected matrix now; returns ``{"<name>/<metric>": value}``."""
        values: dict[str, float] = {}
        with torch.no_grad():
            for record in self.records:
                W = record.matrix()
                W = W.float() if W.dtype in (torch.float16, torch.bfloat16) else W
                power = self._power[record.name]
                # the first measurement starts from random vectors: let it converge
                power.n_iter = self.power_iters if power.v is not None else _WARMUP_ITERS
                sigma = float(power(W))
                fro2 = float(W.double().square().sum())
                stem = record.name[:-len(".weight")] if record.name.endswith(".weight") else record.name
                for metric in self.metrics:
                    if metric == "sigma_max":
                        value = sigma
                    elif metric == "frobenius_norm":
                        value = fro2 ** 0.5
                    elif metric == "stable_rank":
                        value = fro2 / sigma**2 if sigma > 0 else float("nan")
                    elif metric in LOSS_METRICS:
                        continue
                    elif metric == "intruders":
                        value = intruder_count(self._start[record.name], W, self.intruder_k, self.epsilon)
                    elif metric == "alpha":
                        value = spectrum_alpha(W)
                    elif metric == "topk_energy":
                        top = linalg.svdvals(W, k=min(self.k, min(W.shape)), seed=0).double()
                        value = float(top.square().sum()) / fro2 if fro2 > 0 else float("nan")
                    else:
                        value = effective_rank(linalg.svdvals(W).double())
                    values[f"{stem}/{metric}"] = value
        return values

    def step(self, step: int) -> dict[str, Any] | None:
        """Call once per training step; measures and logs when ``step % every == 0``."""
        if step % self.every:
            return None
        row = {"step": int(step), **self.measure()}
        if self.loss_metrics:
            due = step % self.curvature_every == 0
            values = (curvature_metrics(self.model, self.loss_fn, self.batches, forward=self.forward,
                                        params=self.curvature_params, k=self.alignment_k,
                                        alignment="alignment" in self.loss_metrics) if due else {})
            row.update({f"loss/{m}": values.get(m, float("nan")) for m in self.loss_metrics})
        self.history.append(row)
        if self.csv_path is not None:
            self._write_csv(self.csv_path)
        if self._writer is not None:
            for key, value in row.items():
                if key != "step":
                    self._writer.add_scalar(key, value, global_step=step)
            self._writer.flush()
        return row

    def _write_csv(self, path: str | os.PathLike) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(self.history[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.history)
        with atomic_write(path) as handle:
            handle.write(buffer.getvalue())

    def report_section(self, *, heading: str = "Training: metrics over steps") -> Any:
        """The metrics over steps as a section of the analyze HTML report: pass it as
        ``sk.analyze(model).to_html(path, sections=[monitor.report_section()])``
        (a :class:`~spectrakit.analyze.report.ReportSection`).

        Args:
            heading: the section's title.
        """
        from .monitor_report import monitor_section

        return monitor_section(self.history, heading=heading)

    def to_html(self, path: str | os.PathLike, *, title: str | None = None, table: Any = None) -> os.PathLike:
        """Write the monitored metrics over steps as self-contained HTML, atomically
        (see :mod:`spectrakit.analyze.monitor_report`).

        Args:
            path: the ``.html`` file.
            title: the page's title.
            table: a :class:`~spectrakit.analyze.table.SpectrumTable` (e.g. ``sk.analyze(model)``
                at the end of training): write its analyze report with the metrics as a
                section of it. ``None``: the metrics alone on a page.
        """
        if table is not None:
            return table.to_html(path, title=title, sections=[self.report_section()])
        from .monitor_report import write_monitor_html

        return write_monitor_html(self.history, path, title=title)

    def callback(self) -> Any:  # a transformers.TrainerCallback (transformers is optional)
        """A ``transformers.TrainerCallback`` that calls :meth:`step` at each optimizer step."""
        try:
            from transformers import TrainerCallback
        except ImportError as error:
            raise SpectrakitError("callback() needs transformers: pip install 'spectrakit[hf]'") from error
        monitor = self

        class _SpectralCallback(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                monitor.step(state.global_step)

        return _SpectralCallback()
