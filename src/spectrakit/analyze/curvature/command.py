"""``spectrakit hessian [SOURCE] --top 5 --trace --density --per-layer --out DIR``.

SOURCE is a local Hugging Face causal-LM folder; without it the bundled reference model
is used. The loss is next-token cross-entropy on windows of the code corpus
(``spectrakit.data.code_corpus("train")``), fed as bytes to a byte-level model and
through the folder's tokenizer otherwise. Outputs under ``--out``, each written
atomically: ``hessian.json`` (top eigenvalues, trace ± standard error, the settings),
``per_layer.csv``/``per_layer.json`` with ``--per-layer``, and ``density.csv`` plus
``density.png`` (when matplotlib is installed) with ``--density``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from ..._argtypes import int_at_least, nonneg_int, positive_float, positive_int

DEFAULT_OUT = "spectrakit-hessian"


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register the ``hessian`` verb.

    Args:
        commands: the sub-parsers of the ``spectrakit`` parser.
    """
    parser = commands.add_parser(
        "hessian", help="top eigenvalues, trace and spectral density of the loss curvature",
        description="Curvature spectrum of a causal LM's next-token loss on the code corpus "
                    "(default: the bundled reference model).")
    parser.add_argument("source", nargs="?", help="Hugging Face model folder (default: the bundled reference model)")
    parser.add_argument("--kind", default="hessian", choices=("hessian", "ggn", "fisher"),
                        help="curvature matrix (default: hessian)")
    parser.add_argument("--params", action="append", help="parameter-name glob (repeatable; default: all)")
    parser.add_argument("--top", type=nonneg_int, default=5, help="top eigenvalues (default 5; 0: none)")
    parser.add_argument("--tol", type=positive_float, default=1e-3, help="Lanczos relative residual (default 1e-3)")
    parser.add_argument("--trace", action="store_true", help="estimate the trace (Hutch++)")
    parser.add_argument("--probes", type=int_at_least(3), default=30, help="trace products (default 30)")
    parser.add_argument("--density", action="store_true",
                        help="spectral density (Lanczos quadrature; exact when n ≤ steps × probes)")
    parser.add_argument("--steps", type=positive_int, default=40, help="Lanczos steps per density probe (default 40)")
    parser.add_argument("--density-probes", type=positive_int, default=4, help="density probes (default 4)")
    parser.add_argument("--per-layer", action="store_true", help="top eigenvalue and trace of every layer's block")
    parser.add_argument("--batches", type=positive_int, default=1, help="batches averaged (default 1)")
    parser.add_argument("--batch-size", type=positive_int, default=2, help="sequences per batch (default 2)")
    parser.add_argument("--seq-len", type=int_at_least(2), default=32, help="tokens per sequence (default 32)")
    parser.add_argument("--seed", type=nonneg_int, default=0, help="data and probe seed (default 0)")
    parser.add_argument("--float64", action="store_true", help="compute in float64")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    parser.set_defaults(run=run)


def lm_loss(logits: Any, ids: Any) -> Any:
    """Mean next-token cross-entropy of ``logits`` (``B × T × V``) on ``ids`` (``B × T``), in float32 or wider.

    Args:
        logits: the model's logits.
        ids: the input token ids.
    """
    import torch

    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    flat = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    return torch.nn.functional.cross_entropy(flat, ids[:, 1:].reshape(-1), reduction="none")


def lm_forward(model: Any, batch: Any) -> tuple[Any, Any]:
    """``(model(input_ids=batch), batch)``: a batch of token ids is its own target.

    Args:
        model: the causal LM.
        batch: token ids ``B × T``.
    """
    return model(input_ids=batch), batch


def _write_density_plot(density: Any, path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from ..._atomic import atomic_save_path

    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.semilogy(density.grid.numpy(), density.density.clamp_min(1e-12).numpy())
    axis.set_xlabel("eigenvalue")
    axis.set_ylabel("density")
    axis.set_title(title)
    figure.tight_layout()
    with atomic_save_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
    return True


def run(args: argparse.Namespace) -> int:
    """Run ``spectrakit hessian``; returns the exit status.

    Args:
        args: the parsed command line.
    """
    import torch

    from ... import data
    from ..._atomic import atomic_write
    from ..._progress import progress
    from ...compress.command import _load_source, calibration_batches
    from ...errors import SpectrakitError
    from .spectra import hessian

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SpectrakitError(f"--out {out}: exists and is not a folder")
    if not (args.top or args.trace or args.density or args.per_layer):
        raise SpectrakitError("nothing to compute: give --top N, --trace, --density or --per-layer")
    model, tokenizer = _load_source(args.source)
    model = model.to(torch.float64 if args.float64 else torch.float32).eval()
    count = args.batches * args.batch_size
    text = data.code_corpus("train", max_bytes=max(1_000_000, 16 * count * args.seq_len))
    batches = calibration_batches(text, tokenizer, count, args.seq_len, args.batch_size, args.seed)
    curvature = hessian(model, lm_loss, batches, params=args.params, kind=args.kind, forward=lm_forward)
    label = args.source or "reference model"
    result: dict[str, Any] = {"source": label, "kind": args.kind, "parameters": curvature.size,
                              "blocks": len(curvature.blocks), "batches": args.batches,
                              "batch_size": args.batch_size, "seq_len": args.seq_len, "seed": args.seed}
    tasks = [name for name, wanted in (("top", args.top > 0), ("trace", args.trace), ("density", args.density),
                                        ("per_layer", args.per_layer)) if wanted]
    density = table = None
    for task in progress(tasks, total=len(tasks), desc=args.kind, enabled=not args.quiet, unit="task"):
        if task == "top":
            top = curvature.top(min(args.top, curvature.size), args.tol, seed=args.seed)
            result.update(top_eigenvalues=[float(v) for v in top.values], lanczos_steps=top.steps,
                          converged=top.converged, tol=args.tol)
        elif task == "trace":
            estimate = curvature.trace(args.probes, seed=args.seed)
            result.update(trace=estimate.value, trace_stderr=estimate.stderr, trace_probes=estimate.probes)
        elif task == "density":
            density = curvature.density(args.steps, args.density_probes, seed=args.seed)
            result.update(density_method=density.method, density_moment1=density.moment(1),
                          density_moment1_stderr=density.moment_stderr(1), density_moment2=density.moment(2),
                          density_moment2_stderr=density.moment_stderr(2), density_steps=args.steps,
                          density_probes=args.density_probes)
        else:
            table = curvature.per_layer(tol=max(args.tol, 1e-3), trace_probes=args.probes, trace=args.trace,
                                        seed=args.seed, progress=not args.quiet)
    result["products"] = curvature.operator.products
    with atomic_write(out / "hessian.json") as handle:
        json.dump({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()},
                  handle, indent=1)
        handle.write("\n")
    written = [out / "hessian.json"]
    if table is not None:
        table.to_csv(out / "per_layer.csv")
        table.to_json(out / "per_layer.json")
        written += [out / "per_layer.csv", out / "per_layer.json"]
    if density is not None:
        with atomic_write(out / "density.csv") as handle:
            handle.write("eigenvalue,density\n")
            for row in density.as_rows():
                handle.write(f"{row['eigenvalue']!r},{row['density']!r}\n")
        written.append(out / "density.csv")
        if _write_density_plot(density, out / "density.png", f"{args.kind} spectral density: {label}"):
            written.append(out / "density.png")
    if not args.quiet:
        if "top_eigenvalues" in result:
            print("top eigenvalues: " + ", ".join(f"{v:.6g}" for v in result["top_eigenvalues"])
                  + ("" if result["converged"] else f" (not converged in {result['lanczos_steps']} steps)"))
        if "trace" in result:
            print(f"trace: {result['trace']:.6g} ± {result['trace_stderr']:.3g} ({result['trace_probes']} products)")
        if table is not None:
            print(table.format())
        print("wrote " + ", ".join(str(path) for path in written))
    return 0
