"""The ``spectrakit`` command line.

    spectrakit analyze [SOURCE] [--out DIR]

Each verb's sub-command lives in its own folder (``analyze/command.py``, …) and is
listed in ``COMMANDS``. A user error (missing file, corrupt checkpoint, bad option)
prints one line and exits with status 2; Ctrl-C exits with 130. No traceback
reaches the user. A verb with an ``--out`` option (a folder, unless its parser sets the
default ``out_is_file=True``) has it checked for writability before its ``run`` starts
(:func:`spectrakit._atomic.check_writable_folder`), so no work is lost to a bad ``--out``;
numeric options are range-checked while parsing (:mod:`spectrakit._argtypes`). A
:class:`~spectrakit.errors.SpectrakitWarning` raised during the work prints as one
``spectrakit: warning: …`` line.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from ._atomic import check_writable_folder
from .errors import SpectrakitError, SpectrakitWarning

# modules with add_parser(subparsers) that set `run` as the parser default
COMMANDS = ("spectrakit.analyze.command", "spectrakit.adapt.command", "spectrakit.adapt.init_command",
            "spectrakit.compress.command",
            "spectrakit.optimize.command", "spectrakit.analyze.curvature.command")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not the usage block
        raise SpectrakitError(f"{self.prog}: {message}")


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: object = None, line: str | None = None) -> None:
    """One ``spectrakit: warning: …`` line for our warnings; Python's usual form for the rest."""
    if issubclass(category, SpectrakitWarning):
        print(f"spectrakit: warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="spectrakit", description="The singular spectrum of neural networks.")
    parser.add_argument("--version", action="version", version=f"spectrakit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in COMMANDS:
        importlib.import_module(module).add_parser(commands)
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
        if getattr(args, "out", None) is not None:
            out = Path(args.out)
            check_writable_folder(out.parent if getattr(args, "out_is_file", False) else out)
        with warnings.catch_warnings():
            warnings.simplefilter("always", SpectrakitWarning)
            warnings.showwarning = _show_warning
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
