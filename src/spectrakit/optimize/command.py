"""``spectrakit pretrain --optimizer M --steps N``: train the reference architecture from scratch.

A fresh, seeded initialization of the bundled reference model's architecture (a
byte-level Llama) is trained on the stdlib code corpus with
``spectrakit.optimize.for_model(model, M)`` (hidden matrices to ``M``, the rest to
AdamW), a linear-warmup cosine schedule, and evaluated at the end in held-out bits per
byte on the code validation split. Outputs, written atomically under ``--out``:
``model.safetensors``, ``config.json`` and ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .._argtypes import int_at_least, nonneg_float, nonneg_int, positive_float, positive_int

DEFAULT_OUT = "spectrakit-pretrain"


def add_parser(commands: argparse._SubParsersAction) -> None:
    from .routing import METHODS

    parser = commands.add_parser(
        "pretrain", help="train the reference architecture from scratch with a spectral optimizer",
        description="Train a fresh, seeded reference model on the stdlib code corpus and report held-out "
                    "bits per byte.")
    parser.add_argument("--optimizer", choices=METHODS, default="muon",
                        help="for the hidden matrices; the rest gets AdamW (default: muon)")
    parser.add_argument("--steps", type=positive_int, default=200, help="optimizer steps (default: 200)")
    parser.add_argument("--lr", type=positive_float, help="the optimizer's peak learning rate (default: per method)")
    parser.add_argument("--adamw-lr", type=positive_float, default=3e-3,
                        help="peak learning rate of the AdamW part (default: 3e-3)")
    parser.add_argument("--weight-decay", type=nonneg_float, default=0.0, help="decoupled weight decay (default: 0)")
    parser.add_argument("--warmup", type=nonneg_int, help="warmup steps (default: 5%% of --steps)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="sequences per step (default: 8)")
    parser.add_argument("--seq-len", type=int_at_least(2), default=128, help="bytes per sequence (default: 128)")
    parser.add_argument("--eval-windows", type=positive_int, default=64, help="held-out windows (default: 64)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="optimizer option, e.g. --option rank=64 (repeatable)")
    parser.add_argument("--seed", type=nonneg_int, default=0, help="initialization and data seed (default: 0)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file

    from .. import data
    from .._atomic import atomic_save_path, atomic_write
    from .._progress import progress
    from ..adapt.command import _option
    from ..adapt.train import bits_per_byte, finetune
    from .pretrain import fresh_reference_model, optimizer_state_bytes, warmup_cosine
    from .routing import for_model

    options = dict(_option(text) for text in args.option)
    model = fresh_reference_model(args.seed)
    optimizer = for_model(model, args.optimizer, lr=args.lr if args.optimizer != "adamw" else args.adamw_lr,
                          adamw_lr=args.adamw_lr, adamw_weight_decay=args.weight_decay,
                          **({"weight_decay": args.weight_decay} if args.optimizer != "adamw" else {}), **options)
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.steps, warmup))
    windows = data.eval_windows(data.code_corpus("validation"), args.seq_len, args.eval_windows)
    batches = data.byte_batches(data.code_corpus("train"), args.batch_size, args.seq_len, seed=args.seed,
                                steps=args.steps)
    log = finetune(model, batches, 0.0, optimizer=optimizer, scheduler=scheduler,
                   progress=lambda items: progress(items, total=args.steps, desc=f"pretrain {args.optimizer}",
                                                   enabled=not args.quiet, unit="step"))
    bpb = bits_per_byte(model, windows)
    out = Path(args.out)
    with atomic_save_path(out / "model.safetensors") as path:
        save_file({n: p.detach().contiguous() for n, p in model.state_dict().items()}, str(path))
    with atomic_write(out / "config.json") as handle:
        handle.write(model.config.to_json_string())  # type: ignore[union-attr,operator]
    metrics = {
        "optimizer": args.optimizer, "options": options, "steps": args.steps,
        "peak_lr": optimizer.param_groups[0]["initial_lr"], "adamw_lr": args.adamw_lr, "warmup": warmup,
        "weight_decay": args.weight_decay, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "seed": args.seed, "heldout_bpb": round(bpb, 4),
        "final_train_loss_nats": round(sum(log.losses[-10:]) / len(log.losses[-10:]), 4),
        "train_seconds": round(sum(log.step_seconds), 2),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "routing": optimizer.describe().splitlines(),
        "eval": f"spectrakit.data.eval_windows(code_corpus('validation'), {args.seq_len}, {args.eval_windows})",
    }
    with atomic_write(out / "metrics.json") as handle:
        json.dump(metrics, handle, indent=2)
    if not args.quiet:
        print(f"pretrain {args.optimizer}: {args.steps} steps in {metrics['train_seconds']:.1f} s, "
              f"optimizer state {metrics['optimizer_state_bytes'] / 2**20:.1f} MiB")
        print(f"held-out bits/byte on code: {bpb:.4f}")
        print(f"wrote {out / 'model.safetensors'}, {out / 'config.json'} and {out / 'metrics.json'}")
    return 0
