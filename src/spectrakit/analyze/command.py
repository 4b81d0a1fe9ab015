"""``spectrakit analyze [SOURCE] [--out DIR]``."""

from __future__ import annotations

import argparse
from pathlib import Path

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
    parser.add_argument("--quiet", action="store_true", help="no table and no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from .run import analyze

    source = args.source
    if source is None:
        from ..reference import reference_weights_path

        source = str(reference_weights_path())
    table = analyze(source, include=args.include, exclude=args.exclude, method=args.method,
                    dtype=torch.float64 if args.float64 else None, progress=not args.quiet)
    out = Path(args.out)
    table.to_csv(out / "spectra.csv")
    table.to_json(out / "spectra.json")
    if not args.quiet:
        print(table.format())
        summary = table.summary()
        print(f"\n{summary['analyzed']} matrices analyzed, {summary['skipped']} skipped; "
              f"wrote {out / 'spectra.csv'} and {out / 'spectra.json'}")
    return 0
