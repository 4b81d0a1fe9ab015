"""``spectrakit adapter-init SOURCE --method pissa --rank 16 --out DIR``: adapters from a folder.

SOURCE is a Hugging Face checkpoint folder; it is read one tensor at a time
(:func:`spectrakit.adapt.init_from_checkpoint`), never loaded whole. ``DIR`` receives the
residual checkpoint (``config.json``, shards, ``model.safetensors.index.json``, the
tokenizer files) and ``adapter.safetensors``: ``spectrakit.load_adapter(model, DIR /
"adapter.safetensors")`` on ``from_pretrained(DIR)`` gives the adapted model. ``--cache DIR``
reads and fills a :class:`spectrakit.SpectrumCache` with the methods' singular triplets.
"""

from __future__ import annotations

import argparse

from .._argtypes import positive_int
from ..cache import add_cache_option

DEFAULT_OUT = "spectrakit-adapter"


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "adapter-init", help="initialize SVD-based adapters from a checkpoint folder, one tensor at a time",
        description="Write a residual checkpoint and adapter.safetensors for an SVD-initialized adapter "
                    "(pissa, milora, sorsa, …) without loading the whole model.")
    parser.add_argument("source", help="Hugging Face checkpoint folder")
    parser.add_argument("--method", required=True, help="adapter method (pissa, milora, sorsa, lora, svfit, …)")
    parser.add_argument("--rank", type=positive_int, default=8, help="adapter rank (default: 8)")
    parser.add_argument("--targets", action="append", help="layer-name pattern (repeatable; default: all-linear)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="method option, e.g. --option alpha=32 (repeatable)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    add_cache_option(parser, "the singular triplets of the SVD-initialized methods (pissa, milora, svfit, …)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..cache import as_cache, report_cache
    from .command import _option
    from .low_memory import ADAPTER_FILE, init_from_checkpoint

    options = dict(_option(text) for text in args.option)
    cache = as_cache(getattr(args, "cache", None))
    out = init_from_checkpoint(args.source, args.method, rank=args.rank, out=args.out,
                               targets=args.targets or "all-linear", cache=cache, progress=not args.quiet, **options)
    report_cache(cache, args.quiet)
    if not args.quiet:
        print(f"wrote {out} (residual checkpoint) and {out / ADAPTER_FILE}")
    return 0
