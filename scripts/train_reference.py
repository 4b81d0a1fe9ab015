#!/usr/bin/env python
"""Pretrain spectrakit's bundled reference model on the Python standard library.

A byte-level ``LlamaForCausalLM`` (vocabulary = the 256 byte values, so no
tokenizer) is trained on ``spectrakit.data.code_corpus("train")`` and written,
each file atomically, to ``src/spectrakit/reference/``:

* ``model.safetensors`` -- float32 weights,
* ``config.json``       -- the Hugging Face config,
* ``training.json``     -- command, seed, wall time, final train loss, held-out
  bits per byte on code and on prose (docs), and a unigram baseline.

The run is seeded (``torch.manual_seed``, a seeded data generator) and uses only
data already on the machine. Usage::

    python scripts/train_reference.py --steps 640 --threads 1
    python scripts/train_reference.py --steps 5 --out /tmp/ref   # quick smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO / "src"))

from spectrakit import data  # noqa: E402
from spectrakit._atomic import atomic_save_path, atomic_write  # noqa: E402

LN2 = math.log(2.0)


def build_config():
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=256,  # raw bytes
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: k/v projections are 128 x 256
        intermediate_size=688,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=None,  # there are no special tokens in a byte vocabulary
        eos_token_id=None,
        pad_token_id=None,
    )
    config.architectures = ["LlamaForCausalLM"]
    return config


def lr_at(step: int, total: int, peak: float, warmup: int, floor_frac: float = 0.1) -> float:
    """Linear warmup to ``peak``, then cosine decay to ``floor_frac * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor_frac + (1.0 - floor_frac) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def bits_per_byte(model, windows: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-byte cross-entropy of ``model`` on ``windows`` [n, L+1], in bits."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        x = windows[i : i + batch_size]
        logits = model(input_ids=x[:, :-1]).logits
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += x[:, 1:].numel()
    model.train(was_training)
    return total / count / LN2


def unigram_log2_probs(corpus: bytes) -> np.ndarray:
    """log2 of add-one-smoothed byte frequencies of ``corpus``."""
    counts = np.bincount(np.frombuffer(corpus, dtype=np.uint8), minlength=256).astype(np.float64) + 1.0
    return np.log2(counts / counts.sum())


def unigram_bpb(log2p: np.ndarray, targets: np.ndarray) -> float:
    return float(-log2p[targets.astype(np.int64)].mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=640, help="optimizer steps (default 640)")
    parser.add_argument("--out", type=Path, default=REPO / "src" / "spectrakit" / "reference", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 5%% of --steps, at least 1)")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--eval-windows", type=int, default=256, help="held-out windows for the final evaluation")
    parser.add_argument("--evals", type=int, default=5, help="quick held-out evaluations logged during training")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)

    import transformers
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    command = shlex.join(["python", "scripts/train_reference.py", *(sys.argv[1:] if argv is None else argv)])

    # ---- data (fixed splits, see spectrakit.data) ----
    train_bytes = data.code_corpus("train")
    val_code = data.eval_windows(data.code_corpus("validation"), args.seq_len, args.eval_windows)
    val_docs = data.eval_windows(data.docs_corpus("validation"), args.seq_len, args.eval_windows)
    quick_val = val_code[:: max(1, val_code.shape[0] // 32)][:32]
    print(
        f"train corpus {len(train_bytes):,} bytes from {len(data.code_files('train'))} files; "
        f"held-out windows: code {tuple(val_code.shape)}, docs {tuple(val_docs.shape)}",
        flush=True,
    )

    # ---- model ----
    config = build_config()
    model = LlamaForCausalLM(config).float().train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"LlamaForCausalLM: {n_params:,} parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )

    # ---- train ----
    history: list[dict] = []
    eval_every = max(1, args.steps // max(1, args.evals))
    recent: list[float] = []
    t0 = time.perf_counter()
    batches = data.byte_batches(train_bytes, args.batch, args.seq_len, seed=args.seed, steps=args.steps)
    bar = tqdm(batches, total=args.steps, desc="train", unit="step", mininterval=5.0)
    for step, x in enumerate(bar):
        lr = lr_at(step, args.steps, args.lr, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits = model(input_ids=x[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent = (recent + [loss.item()])[-50:]
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", gnorm=f"{grad_norm.item():.2f}", refresh=False)
        if (step + 1) % eval_every == 0 or step + 1 == args.steps:
            point = {
                "step": step + 1,
                "seconds": round(time.perf_counter() - t0, 1),
                "train_loss_nats": round(sum(recent) / len(recent), 4),
                "quick_val_bpb_code": round(bits_per_byte(model, quick_val), 4),
            }
            history.append(point)
            tqdm.write(json.dumps(point))
    bar.close()
    train_seconds = time.perf_counter() - t0
    final_train_loss = sum(recent) / len(recent)

    # ---- evaluate ----
    model.eval()
    val_bpb_code = bits_per_byte(model, val_code)
    val_bpb_docs = bits_per_byte(model, val_docs)
    log2p = unigram_log2_probs(train_bytes)
    unigram_code = unigram_bpb(log2p, val_code[:, 1:].numpy())
    unigram_docs = unigram_bpb(log2p, val_docs[:, 1:].numpy())
    unigram_code_full = unigram_bpb(log2p, np.frombuffer(data.code_corpus("validation"), dtype=np.uint8))
    total_seconds = time.perf_counter() - t0

    info = {
        "command": command,
        "seed": args.seed,
        "steps": args.steps,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "tokens_seen": args.steps * args.batch * args.seq_len,
        "optimizer": {
            "name": "AdamW",
            "peak_lr": args.lr,
            "warmup_steps": warmup,
            "schedule": "linear warmup, cosine decay to 10% of peak",
            "weight_decay": args.weight_decay,
            "betas": [0.9, 0.95],
            "grad_clip": 1.0,
        },
        "threads": args.threads,
        "wall_clock_seconds_train": round(train_seconds, 1),
        "wall_clock_seconds_total": round(total_seconds, 1),
        "final_train_loss_nats": round(final_train_loss, 4),
        "final_train_bpb": round(final_train_loss / LN2, 4),
        "final_train_loss_note": "mean cross-entropy of the last 50 training batches",
        "eval_windows": args.eval_windows,
        "eval_windows_code": int(val_code.shape[0]),
        "eval_windows_docs": int(val_docs.shape[0]),
        "val_bpb_code": round(val_bpb_code, 4),
        "unigram_bpb_code": round(unigram_code, 4),
        "unigram_bpb_code_full_validation": round(unigram_code_full, 4),
        "val_bpb_docs": round(val_bpb_docs, 4),
        "unigram_bpb_docs": round(unigram_docs, 4),
        "eval_note": (
            "bits per byte = next-byte cross-entropy / ln 2 on spectrakit.data.eval_windows(corpus('validation'), "
            "seq_len, eval_windows); unigram = add-one-smoothed byte frequencies of the code training corpus"
        ),
        "train_corpus_bytes": len(train_bytes),
        "train_files": len(data.code_files("train")),
        "validation_files": len(data.code_files("validation")),
        "parameters": n_params,
        "history": history,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
    }

    # ---- write (each file atomically; training.json last, as the "run complete" marker) ----
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().to(torch.float32).contiguous().clone() for name, t in model.state_dict().items()}
    with atomic_save_path(out / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    with atomic_write(out / "config.json") as f:
        f.write(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    with atomic_write(out / "training.json") as f:
        f.write(json.dumps(info, indent=2) + "\n")

    print(
        f"done in {total_seconds:.0f}s: held-out code {val_bpb_code:.3f} bits/byte "
        f"(unigram {unigram_code:.3f}), docs {val_bpb_docs:.3f} (unigram {unigram_docs:.3f}); wrote {out}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
