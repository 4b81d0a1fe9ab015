"""The ``spectrakit`` command line.

    spectrakit analyze [SOURCE] [--out DIR]

A user error (missing file, corrupt checkpoint, bad option) prints one line and
exits with status 2; Ctrl-C exits with 130. No traceback reaches the user.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

from .errors import SpectrakitError

DEFAULT_OUT = "spectrakit-report"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not the usage block
        raise SpectrakitError(f"{self.prog}: {message}")


def _add_analyze(commands: argparse._SubParsersAction) -> None:
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
    parser.set_defaults(run=_run_analyze)


def _run_analyze(args: argparse.Namespace) -> int:
    import torch

    from .analyze import analyze

    source = args.source
    if source is None:
        from .reference import reference_weights_path

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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spectrakit", description="The singular spectrum of neural networks.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"spectrakit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_analyze(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``spectrakit`` console script; returns the exit status."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        run: Callable[[argparse.Namespace], int] = args.run
        return run(args)
    except SpectrakitError as error:
        print(f"spectrakit: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spectrakit: interrupted", file=sys.stderr)
        return 130
    except OSError as error:  # e.g. an unwritable --out folder
        print(f"spectrakit: error: {error.filename or ''}: {error.strerror or error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
