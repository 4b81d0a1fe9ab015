"""``spectrakit compress [SOURCE] --method svd-llm --ratio 0.3 --calib N --out DIR``.

SOURCE is a local Hugging Face model folder (``config.json`` + safetensors weights);
without it the bundled reference model is compressed. Calibration text is the code
corpus (``spectrakit.data.code_corpus("train")``) unless ``--calib-text FILE`` is given;
it is fed as raw bytes to a byte-level model (vocabulary 256, like the reference
model) and through the folder's own tokenizer otherwise. Outputs, written atomically
under ``--out``: ``model.safetensors``, ``compress.json`` and ``config.json``
(``spectrakit.load_compressed(DIR)``) and ``report.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

from .._argtypes import int_at_least, nonneg_int, open_fraction, positive_int, unit_fraction

DEFAULT_OUT = "spectrakit-compressed"


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "compress", help="compress a model's linear layers with a truncated-SVD method",
        description="Replace linear layers by low-rank factors under one parameter budget.")
    parser.add_argument("source", nargs="?", help="Hugging Face model folder (default: the bundled reference model)")
    parser.add_argument("--method", default="svd-llm", help="svd, asvd, fwsvd or svd-llm (default: svd-llm)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=open_fraction, help="fraction of the targeted weights to remove (default: 0.3)")
    budget.add_argument("--rank", type=positive_int, help="one rank for every layer")
    budget.add_argument("--energy", type=unit_fraction, help="keep this fraction of each layer's Σσ²")
    parser.add_argument("--allocation", default="uniform", choices=("uniform", "global"),
                        help="rank allocation (default: uniform)")
    parser.add_argument("--calib", type=positive_int, default=32, metavar="N",
                        help="calibration sequences (default: 32)")
    parser.add_argument("--seq-len", type=int_at_least(2), default=256,
                        help="tokens per calibration sequence (default: 256)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward pass (default: 8)")
    parser.add_argument("--calib-text", help="UTF-8 text file to calibrate on (default: the code corpus)")
    parser.add_argument("--targets", action="append", help="layer-name pattern (repeatable; default: all-linear)")
    parser.add_argument("--seed", type=nonneg_int, default=0, help="calibration sampling seed (default: 0)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
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
    from .. import data
    from .._atomic import atomic_write
    from ..errors import SpectrakitError
    from .api import METHODS, compress
    from .base import CompressionWarning
    from .persist import save_compressed

    if args.method not in METHODS:
        raise SpectrakitError(f"--method {args.method!r} is not one of {', '.join(METHODS)}")
    if args.calib < 1 or args.seq_len < 2 or args.batch_size < 1:
        raise SpectrakitError(f"--calib, --seq-len and --batch-size must be ≥ 1 (seq-len ≥ 2), got "
                              f"{args.calib}, {args.seq_len} and {args.batch_size}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SpectrakitError(f"--out {out}: exists and is not a folder")
    budget = {"ratio": args.ratio, "rank": args.rank, "energy": args.energy}
    if all(value is None for value in budget.values()):
        budget["ratio"] = 0.3
    model, tokenizer = _load_source(args.source, needs_text=args.method != "svd")
    calibration = None
    if args.method != "svd":
        if args.calib_text:
            try:
                text = Path(args.calib_text).read_bytes()
            except OSError as error:
                raise SpectrakitError(f"--calib-text {args.calib_text}: {error.strerror or error}") from None
        else:
            text = data.code_corpus("train", max_bytes=max(2_000_000, 4 * args.calib * args.seq_len))
        calibration = calibration_batches(text, tokenizer, args.calib, args.seq_len, args.batch_size, args.seed)
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            # the text is both the encoder's input and the decoder's target
            calibration = [{"input_ids": ids, "labels": ids} for ids in calibration]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CompressionWarning)
        report = compress(model, method=args.method, calibration=calibration, allocation=args.allocation,
                          targets=args.targets or "all-linear", progress=not args.quiet, **budget)
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
