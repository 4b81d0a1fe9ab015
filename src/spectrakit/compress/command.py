"""``spectrakit compress [SOURCE] --method svd-llm --ratio 0.3 --calib N --out DIR``.

SOURCE is a local Hugging Face model folder (``config.json`` + safetensors weights);
without it the bundled reference model is compressed. Calibration text is the code
corpus (``spectrakit.data.code_corpus("train")``) unless ``--calib-text FILE`` is given;
it is fed as raw bytes to a byte-level model (vocabulary 256, like the reference
model) and through the folder's own tokenizer otherwise. Outputs, written atomically
under ``--out``: ``model.safetensors``, ``compress.json`` and ``config.json``
(``spectrakit.load_compressed(DIR)``) and ``report.json``. ``--low-memory`` compresses the
SOURCE folder block by block instead, writing shards and their index
(:mod:`spectrakit.compress.low_memory`). Under ``torchrun`` every rank
calibrates on its share of the batches and decomposes its share of the layers; rank 0
writes the outputs, once every rank has succeeded. ``--cache DIR`` reads and fills a
:class:`spectrakit.SpectrumCache` with ``--method svd``'s spectra (its closing line gives the
hits and misses); the other methods' spectra depend on the calibration and are not cached.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

from .._argtypes import float_in, int_at_least, nonneg_int, open_fraction, positive_float, positive_int, unit_fraction
from ..cache import add_cache_option

DEFAULT_OUT = "spectrakit-compressed"


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "compress", help="compress a model's linear layers with a truncated-SVD method",
        description="Replace linear layers by low-rank factors under one parameter budget.")
    parser.add_argument("source", nargs="?", help="Hugging Face model folder (default: the bundled reference model)")
    parser.add_argument("--method", default="svd-llm",
                        help="svd, asvd, fwsvd, gfwsvd, svd-llm, svd-llm-v2, modegpt, monarch or btt "
                             "(default: svd-llm)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=open_fraction, help="fraction of the targeted weights to remove (default: 0.3)")
    budget.add_argument("--rank", type=positive_int, help="one rank for every layer")
    budget.add_argument("--energy", type=unit_fraction, help="keep this fraction of each layer's Σσ²")
    parser.add_argument("--allocation", choices=("uniform", "global", "heterogeneous", "sensitivity"),
                        help="rank allocation (default: the method's own, heterogeneous for svd-llm-v2 and "
                             "uniform otherwise)")
    parser.add_argument("--search-batches", type=positive_int, metavar="N",
                        help="--allocation sensitivity: measure the loss on the first N calibration batches "
                             "(default: all)")
    parser.add_argument("--lora-update", action="store_true",
                        help="after truncation, fine-tune each layer's two factors on the calibration batches")
    parser.add_argument("--lora-lr", type=positive_float, default=1e-4, help="--lora-update's learning rate "
                        "(default: 1e-4)")
    parser.add_argument("--lora-epochs", type=positive_int, default=2,
                        help="--lora-update's passes over the batches per factor (default: 2)")
    options = parser.add_argument_group("method options (each passed only when given)")
    options.add_argument("--alpha", type=float_in(0.0, 2.0), help="asvd: the activation-scaling exponent (default 0.5)")
    options.add_argument("--damping", type=positive_float,
                         help="svd-llm, gfwsvd: the ridge of a singular statistic; modegpt: the leverage ridge")
    options.add_argument("--factors", choices=("kronecker", "row-diagonal"),
                         help="gfwsvd: both Kronecker factors, or the row diagonal only (fwsvd)")
    options.add_argument("--modules", help="modegpt: the pairs to compress, comma-separated, of mlp, qk, vo "
                         "(default: all three)")
    options.add_argument("--blocks", type=positive_int, help="monarch, btt: the number of blocks")
    parser.add_argument("--calib", type=positive_int, default=32, metavar="N",
                        help="calibration sequences (default: 32)")
    parser.add_argument("--seq-len", type=int_at_least(2), default=256,
                        help="tokens per calibration sequence (default: 256)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward pass (default: 8)")
    parser.add_argument("--calib-text", help="UTF-8 text file to calibrate on (default: the code corpus)")
    parser.add_argument("--targets", action="append", help="layer-name pattern (repeatable; default: all-linear)")
    parser.add_argument("--seed", type=nonneg_int, default=0, help="calibration sampling seed (default: 0)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--low-memory", action="store_true",
                        help="compress the SOURCE folder block by block, one block in memory, writing --out shard "
                             "by shard (svd, asvd, svd-llm, svd-llm-v2; uniform allocation)")
    add_cache_option(parser, "--method svd's spectra (the other methods' depend on the calibration and are not cached)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    parser.set_defaults(run=run)


def _load_source(source: str | None, needs_text: bool = True) -> tuple[Any, Any]:
    """(model, tokenizer or None) for SOURCE; None means the reference model (bytes).
    ``needs_text``: the method calibrates, so the text must be encodable."""
    from ..errors import SpectrakitError

    if source is None:
        from ..reference import reference_model

        return reference_model(), None
    folder = Path(source)
    if not (folder / "config.json").is_file():
        raise SpectrakitError(f"{folder}: not a Hugging Face model folder (no config.json)")
    try:
        import transformers
    except ImportError:
        raise SpectrakitError(
            "compressing a Hugging Face folder needs transformers: pip install 'spectrakit[hf]'") from None
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        architecture = (config.architectures or [""])[0]
        cls = getattr(transformers, architecture, None) or transformers.AutoModelForCausalLM
        model = cls.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    except Exception as error:  # transformers raises many types for a bad folder
        line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SpectrakitError(f"{folder}: cannot load the model ({line})") from None
    tokenizer = None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception:  # no tokenizer files: only a byte-level model can be calibrated
        if needs_text and getattr(model.config, "vocab_size", None) != 256:
            raise SpectrakitError(f"{folder}: no tokenizer to encode calibration text and the vocabulary is "
                                  "not byte-level; add tokenizer files or use --method svd") from None
    return model.eval(), tokenizer


def calibration_text(args: argparse.Namespace) -> bytes:
    """The calibration text: ``--calib-text``'s file, else enough of the code corpus's
    training split for ``--calib`` windows of ``--seq-len`` (args: ``args``, the parsed CLI)."""
    from .. import data
    from ..errors import SpectrakitError

    if not args.calib_text:
        return data.code_corpus("train", max_bytes=max(2_000_000, 4 * args.calib * args.seq_len))
    try:
        return Path(args.calib_text).read_bytes()
    except OSError as error:
        raise SpectrakitError(f"--calib-text {args.calib_text}: {error.strerror or error}") from None


def calibration_batches(text: bytes, tokenizer: Any, count: int, seq_len: int, batch_size: int,
                        seed: int) -> list[Any]:
    """``count`` windows of ``seq_len`` tokens in batches of ``batch_size`` (bytes or token ids)."""
    import torch

    from .. import data
    from ..errors import SpectrakitError

    steps = math.ceil(count / batch_size)
    if tokenizer is None:
        batches = [b[:, :-1] for b in data.byte_batches(text, batch_size, seq_len, seed=seed, steps=steps)]
    else:
        ids = tokenizer(text[: count * seq_len * 16].decode("utf-8", errors="replace"))["input_ids"]
        ids = torch.tensor(ids, dtype=torch.long)
        if ids.numel() < seq_len + 1:
            raise SpectrakitError(f"calibration text gives {ids.numel()} tokens, need at least {seq_len + 1}")
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, ids.numel() - seq_len, (steps, batch_size), generator=generator)
        batches = [ids[row[:, None] + torch.arange(seq_len)] for row in starts]
    extra = steps * batch_size - count
    if extra:
        batches[-1] = batches[-1][: batch_size - extra]
    return batches


def run(args: argparse.Namespace) -> int:
    from ..cache import as_cache, report_cache, use_cache

    cache = as_cache(getattr(args, "cache", None))
    if cache is not None and args.method != "svd":
        print(f"spectrakit: warning: --cache {cache.path}: only --method svd reads and writes the spectrum cache "
              f"({args.method}'s spectra depend on the calibration)", file=sys.stderr)
        cache = None
    if args.low_memory:  # block by block, one block in memory (compress/low_memory.py)
        from .low_memory import run_command

        with use_cache(cache):  # plain svd's spectra read it
            code = run_command(args)
        report_cache(cache, args.quiet)
        return code
    from .._distributed import torchrun_group

    with torchrun_group() as rank:  # under torchrun every rank takes a share; rank 0 writes
        code = _run(args, rank, cache)
        if rank == 0:
            report_cache(cache, args.quiet)
        return code


def _run(args: argparse.Namespace, rank: int, cache: Any = None) -> int:
    from .._atomic import atomic_write
    from .._distributed import agree
    from ..errors import SpectrakitError
    from .api import METHODS, compress
    from .base import CompressionWarning
    from .persist import save_compressed
    from .structured import STRUCTURES

    methods = [*METHODS, "modegpt", *STRUCTURES]
    if args.method not in methods:
        raise SpectrakitError(f"--method {args.method!r} is not one of {', '.join(methods)}")
    if args.calib < 1 or args.seq_len < 2 or args.batch_size < 1:
        raise SpectrakitError(f"--calib, --seq-len and --batch-size must be ≥ 1 (seq-len ≥ 2), got "
                              f"{args.calib}, {args.seq_len} and {args.batch_size}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SpectrakitError(f"--out {out}: exists and is not a folder")
    budget = {"ratio": args.ratio, "rank": args.rank, "energy": args.energy}
    if all(value is None for value in budget.values()):
        budget["ratio"] = 0.3
    options: dict[str, Any] = {name: getattr(args, name) for name in ("alpha", "damping", "factors", "blocks")
                               if getattr(args, name) is not None}
    if args.modules is not None:
        options["modules"] = tuple(part.strip() for part in args.modules.split(",") if part.strip())
    if args.lora_update:
        options.update(lora_update=True, lora_lr=args.lora_lr, lora_epochs=args.lora_epochs)
    if args.search_batches is not None:
        options["search_batches"] = args.search_batches
    # calibration text is read for every method but plain svd, and for what measures a loss on it
    calibrates = args.method != "svd" or args.lora_update or args.allocation == "sensitivity"
    # a rank that cannot read the model stops every rank with one line
    model, tokenizer = agree(lambda: _load_source(args.source, needs_text=calibrates), "load")
    calibration = None
    if calibrates:
        calibration = calibration_batches(calibration_text(args), tokenizer,
                                          args.calib, args.seq_len, args.batch_size, args.seed)
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            # the text is both the encoder's input and the decoder's target
            calibration = [{"input_ids": ids, "labels": ids} for ids in calibration]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CompressionWarning)
        report = compress(model, method=args.method, calibration=calibration, allocation=args.allocation,
                          targets=args.targets or "all-linear", progress=not args.quiet, cache=cache, **budget,
                          **options)
    if rank != 0:
        return 0
    for warning in caught:
        print(f"spectrakit: warning: {warning.message}", file=sys.stderr)
    if not args.quiet:  # before the writes: should they fail, the report still shows
        print(report)
    save_compressed(model, out, report)
    with atomic_write(out / "report.json") as handle:
        json.dump({"source": args.source or "reference model", "calibration_sequences": args.calib,
                   "seq_len": args.seq_len, **report.to_dict()}, handle, indent=2)
    if not args.quiet:
        print(f"wrote {out / 'model.safetensors'}, {out / 'compress.json'} and {out / 'report.json'}")
    return 0
