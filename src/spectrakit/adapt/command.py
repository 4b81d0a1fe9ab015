"""``spectrakit finetune --method M --rank R --steps N``: fine-tune the reference model.

The bundled byte-level Llama (pretrained on Python code) is adapted with ``M`` and
trained on the English documentation corpus (``spectrakit.data.docs_corpus("train")``);
held-out bits per byte on the validation split are reported before and after. Outputs,
written atomically under ``--out``: ``adapter.safetensors`` (``spectrakit.load_adapter``)
and ``metrics.json``. Under ``torchrun`` the ranks share the adapters' SVD initialization
(:mod:`spectrakit.adapt.distributed`) and train alike; rank 0 writes the outputs.
``--cache DIR`` reads and fills a :class:`spectrakit.SpectrumCache` with the singular
triplets the SVD-initialized methods start from (its closing line gives the hits and misses).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .._argtypes import int_at_least, nonneg_float, nonneg_int, positive_float, positive_int
from ..cache import add_cache_option

DEFAULT_OUT = "spectrakit-finetune"


def _option(text: str) -> tuple[str, Any]:
    from ..errors import SpectrakitError

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SpectrakitError(f"--option {text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value  # a bare string such as pattern=banded


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "finetune", help="fine-tune the reference model with an SVD-based adapter",
        description="Fine-tune the bundled reference model on the English docs corpus and report "
                    "held-out bits per byte.")
    parser.add_argument("--method", required=True, help="adapter method (lora, pissa, svfit, …)")
    parser.add_argument("--rank", type=positive_int, default=8, help="adapter rank (default: 8)")
    parser.add_argument("--steps", type=positive_int, default=200, help="optimizer steps (default: 200)")
    parser.add_argument("--lr", type=positive_float, help="learning rate (default: per method)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="sequences per step (default: 8)")
    parser.add_argument("--seq-len", type=int_at_least(2), default=128, help="bytes per sequence (default: 128)")
    parser.add_argument("--eval-windows", type=positive_int, default=64, help="held-out windows (default: 64)")
    parser.add_argument("--targets", action="append", help="layer-name pattern (repeatable; default: all-linear)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="method option, e.g. --option pattern=banded (repeatable)")
    parser.add_argument("--penalty", type=nonneg_float, default=0.0, help="weight of adapter_penalty (SORSA, HRA)")
    parser.add_argument("--optimizer", choices=("adamw", "muon", "soap", "shampoo", "galore", "multinorm"),
                        default="adamw", help="optimizer of the adapter's matrices (spectrakit.optimize.for_model; "
                        "its own default lr unless --lr; the rest keeps AdamW; default: adamw)")
    parser.add_argument("--seed", type=nonneg_int, default=0, help="data and initialization seed (default: 0)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    add_cache_option(parser, "the singular triplets of the SVD-initialized methods (pissa, milora, svfit, …)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .._distributed import torchrun_group
    from ..cache import as_cache, report_cache

    cache = as_cache(getattr(args, "cache", None))
    with torchrun_group() as rank:  # under torchrun the SVD initialization is shared; rank 0 writes
        code = _run(args, rank, cache)
        if rank == 0:
            report_cache(cache, args.quiet)
        return code


def _run(args: argparse.Namespace, rank: int, cache: Any = None) -> int:
    import torch

    from .. import data
    from .._atomic import atomic_write
    from .._progress import progress
    from ..errors import SpectrakitError
    from ..reference import reference_model
    from .api import adapt, save_adapter, trainable_parameters
    from .base import get_method
    from .train import DEFAULT_LR, bits_per_byte, finetune

    get_method(args.method)
    if args.steps < 1 or args.rank < 1:
        raise SpectrakitError(f"--steps and --rank must be ≥ 1, got {args.steps} and {args.rank}")
    options = dict(_option(text) for text in args.option)
    torch.manual_seed(args.seed)
    model = reference_model()
    train = data.docs_corpus("train")
    windows = data.eval_windows(data.docs_corpus("validation"), args.seq_len, args.eval_windows)
    before = bits_per_byte(model, windows)
    if args.method == "eva":
        options.setdefault("calibration", [b[:, :-1] for b in data.byte_batches(
            train, args.batch_size, args.seq_len, seed=args.seed + 1, steps=4)])
    adapt(model, args.method, rank=args.rank, targets=args.targets or "all-linear", cache=cache, **options)
    options.pop("calibration", None)
    batches = data.byte_batches(train, args.batch_size, args.seq_len, seed=args.seed, steps=args.steps)
    lr = args.lr if args.lr is not None else DEFAULT_LR.get(args.method, 2e-3)
    optimizer = None
    if args.optimizer != "adamw":
        from ..optimize import for_model

        optimizer = for_model(model, args.optimizer, lr=args.lr, adamw_lr=lr, other_matrices=True)
    log = finetune(model, batches, lr, penalty_weight=args.penalty, optimizer=optimizer,
                   progress=lambda items: progress(items, total=args.steps, desc=f"finetune {args.method}",
                                                   enabled=not args.quiet and rank == 0, unit="step"))
    after = bits_per_byte(model, windows)
    out = Path(args.out)
    metrics = {
        "method": args.method, "rank": args.rank, "options": options, "steps": args.steps, "lr": lr,
        "optimizer": args.optimizer,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "seed": args.seed,
        "trainable_parameters": trainable_parameters(model),
        "heldout_bpb_before": round(before, 4), "heldout_bpb_after": round(after, 4),
        "final_train_loss_nats": round(sum(log.losses[-10:]) / len(log.losses[-10:]), 4),
        "train_seconds": round(sum(log.step_seconds), 2),
        "eval": f"spectrakit.data.eval_windows(docs_corpus('validation'), {args.seq_len}, {args.eval_windows})",
    }
    if rank != 0:
        return 0
    if not args.quiet:  # before the writes: should they fail, the results still show
        print(f"{args.method} rank {args.rank}: {metrics['trainable_parameters']:,} trainable parameters, "
              f"{args.steps} steps in {metrics['train_seconds']:.1f} s")
        print(f"held-out bits/byte on the docs: {before:.4f} -> {after:.4f}")
    save_adapter(model, out / "adapter.safetensors")
    with atomic_write(out / "metrics.json") as handle:
        json.dump(metrics, handle, indent=2)
    if not args.quiet:
        print(f"wrote {out / 'adapter.safetensors'} and {out / 'metrics.json'}")
    return 0
