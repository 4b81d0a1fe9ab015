"""``spectrakit analyze [SOURCE] [--out DIR]`` and ``spectrakit compare BASE TUNED``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from .._argtypes import positive_float, positive_int, unit_fraction
from ..cache import add_cache_option

if TYPE_CHECKING:  # the command imports the library lazily, at run time
    from .table import SpectrumTable

DEFAULT_OUT = "spectrakit-report"


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "analyze", help="spectrum metrics of every weight matrix",
        description="Analyze every weight matrix of a checkpoint (default: the bundled reference model).")
    parser.add_argument("source", nargs="?", help="a .safetensors/.bin/.pt file or a Hugging Face folder")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--include", action="append", help="only matrices matching this name pattern (repeatable)")
    parser.add_argument("--exclude", action="append", help="skip matrices matching this name pattern (repeatable)")
    parser.add_argument("--method", default="auto", choices=["auto", "exact", "gram"],
                        help="spectrum method (default: auto)")
    parser.add_argument("--float64", action="store_true", help="compute spectra in float64")
    parser.add_argument("--no-farms", action="store_true", help="skip the FARMS fit")
    parser.add_argument("--xmin", default="ks", type=_xmin,
                        help="power-law xmin: ks (weightwatcher's default), median, or a number")
    parser.add_argument("--mp-fit", default="quantile", choices=["quantile", "iterative", "weightwatcher"],
                        help="Marchenko-Pastur bulk fit for num_spikes/mp_softrank: quantile (default; bulk "
                             "scale from the lower half of the spectrum), iterative (bulk-mean fixed point, "
                             "collapses on heavy-tailed layers) or weightwatcher (its KDE fit; needs scipy)")
    parser.add_argument("--conv-input", type=_shape, metavar="HxW",
                        help="use the exact conv operator spectrum on this input size (e.g. 32x32)")
    parser.add_argument("--conv", default="reshape", choices=["reshape", "slices"],
                        help="conv spectrum: reshape (default; one out x in*k*k matrix) or slices "
                             "(weightwatcher's ESD pooled from the per-tap out x in slices)")
    parser.add_argument("--no-conv2d-norm", action="store_true",
                        help="with --conv slices, leave out weightwatcher's sqrt(1/2) scaling of Conv2d slices")
    parser.add_argument("--no-html", action="store_true", help="do not write report.html")
    parser.add_argument("--quiet", action="store_true", help="no table and no progress bar")
    parser.add_argument("--workers", type=positive_int, default=1, help="local processes sharing the matrices")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="matrices analyzed at a time in this process (default: 1 for files, which "
                             "stream one tensor at a time; e.g. 2 on small models where memory is no concern)")
    add_cache_option(parser, "singular values")
    parser.set_defaults(run=run)
    _add_compare(commands)


def _xmin(text: str) -> str | float:
    if text in ("ks", "median"):
        return text
    try:
        return positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"--xmin {text!r}: expected ks, median or a number > 0") from None


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--conv-input {text!r}: expected sizes like 32x32 or 128")
    return shape


def _add_compare(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "compare", help="intruder dimensions and ΔW between a base and a fine-tuned model",
        description="Compare every weight matrix of TUNED with the same-named matrix of BASE.")
    parser.add_argument("base", help="the base checkpoint (file or folder)")
    parser.add_argument("tuned", help="the fine-tuned checkpoint (file or folder)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("-k", type=positive_int, default=10, help="top singular vectors tested per matrix (default 10)")
    parser.add_argument("--epsilon", type=unit_fraction, default=0.5,
                        help="intruder similarity threshold (default 0.5)")
    parser.add_argument("--include", action="append", help="only matrices matching this name pattern")
    parser.add_argument("--exclude", action="append", help="skip matrices matching this name pattern")
    parser.add_argument("--quiet", action="store_true", help="no table and no progress bar")
    parser.set_defaults(run=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    from .compare import compare

    table = compare(args.base, args.tuned, k=args.k, epsilon=args.epsilon, include=args.include,
                    exclude=args.exclude, progress=not args.quiet)
    _write(table, Path(args.out), "compare", args.quiet)
    return 0


def _write(table: SpectrumTable, out: Path, stem: str, quiet: bool) -> None:
    # the table first: should the folder turn unwritable during the work, the results still show
    if not quiet:
        print(table.format())
    table.to_csv(out / f"{stem}.csv")
    table.to_json(out / f"{stem}.json")
    if not quiet:
        summary = table.summary()
        print(f"\n{summary['analyzed']} matrices analyzed, {summary['skipped']} skipped; "
              f"wrote {out / f'{stem}.csv'} and {out / f'{stem}.json'}")


def run(args: argparse.Namespace) -> int:
    import torch

    from .._distributed import torchrun_group
    from ..cache import as_cache, report_cache
    from .run import analyze

    source = args.source
    if source is None:
        from ..reference import reference_weights_path

        source = str(reference_weights_path())
    cache = as_cache(args.cache)
    with torchrun_group() as rank:
        table = analyze(source, include=args.include, exclude=args.exclude, method=args.method,
                        dtype=torch.float64 if args.float64 else None, farms=not args.no_farms,
                        xmin=args.xmin, mp_fit=args.mp_fit, conv_input_shape=args.conv_input,
                        progress=not args.quiet, conv=args.conv, conv2d_norm=not args.no_conv2d_norm,
                        workers=args.workers, threads=args.threads, cache=cache,
                        keep_spectra=not args.no_html)  # only the HTML report plots the spectra
    if rank == 0:
        report_cache(cache, args.quiet)
        _write(table, Path(args.out), "spectra", args.quiet)
        if not args.no_html:
            html = table.to_html(Path(args.out) / "report.html", title=f"spectrakit: {source}")
            if not args.quiet:
                print(f"report: {html}")
    return 0
