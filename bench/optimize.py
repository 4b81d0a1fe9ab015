"""spectrakit's optimizers against AdamW, torch.optim.Muon and galore-torch, at one budget.

Run:  python bench/optimize.py [--steps 120] [--only adamw,muon] [--skip-train] [--skip-step] [--skip-ddp]

Three parts, each printing a markdown table (and everything to ``--json``):

1. **Pretraining** the reference architecture (the bundled model's ``config.json``,
   narrowed by ``--hidden``/``--layers`` for a CPU budget; ``--full`` keeps it as is)
   from one seeded init on the stdlib code corpus: every run gets the same init, the
   same batches in the same order and the same warmup-cosine schedule. Anchors:
   ``torch.optim.AdamW``; ``torch.optim.Muon`` on the hidden matrices + AdamW on the
   rest (two objects, as torch's docs show); galore-torch's ``GaLoreAdamW``. Then every
   spectrakit optimizer through ``for_model`` (and SAM, Grokfast around AdamW).
   Recorded: held-out bits/byte at several steps and at AdamW's wall-clock, the step
   where AdamW's final bits/byte is first reached, median ms/step, optimizer state.
2. **Muon's step** on the full-size reference model's hidden matrices (fixed random
   gradients): ``spectrakit.optimize.Muon`` (bf16 and float32 Newton–Schulz) against
   ``torch.optim.Muon`` (bf16), interleaved repeats.
3. **Muon under DDP**: the same step with two gloo processes (one thread each), each
   orthogonalizing half the matrices, against one process.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, save_figure  # noqa: E402
from spectrakit import data  # noqa: E402
from spectrakit.adapt.train import bits_per_byte, lm_loss  # noqa: E402
from spectrakit.optimize import SAM, Grokfast, Muon, for_model  # noqa: E402
from spectrakit.optimize.pretrain import warmup_cosine  # noqa: E402

ADAMW_LR = 3e-3
GALORE = {"lr": 0.01, "scale": 0.25}  # GaLore's published LLaMA-60M setting, for both implementations


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from spectrakit.reference import reference_config

    config = reference_config()
    if not args.full:
        config.update(hidden_size=args.hidden, intermediate_size=args.hidden * 688 // 256,
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                      num_key_value_heads=max(1, args.hidden // 128))
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(LlamaConfig.from_dict(config)).float().train()


def hidden_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What for_model sends to the spectral method (the anchors get the same split)."""
    probe = for_model(model, "muon")
    return [p for g in probe.param_groups if not g.get("adamw") for p in g["params"]]


class Pair:
    """Two optimizers stepped as one (torch's documented Muon + AdamW recipe)."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()


def galore_torch(model: torch.nn.Module, rank: int, update_every: int) -> torch.optim.Optimizer:
    from galore_torch import GaLoreAdamW

    hidden = {id(p) for p in hidden_matrices(model)}
    return GaLoreAdamW([{"params": [p for p in model.parameters() if id(p) not in hidden], "lr": ADAMW_LR},
                        {"params": [p for p in model.parameters() if id(p) in hidden], "rank": rank,
                         "update_proj_gap": update_every, "scale": GALORE["scale"], "proj_type": "std",
                         "lr": GALORE["lr"]}], lr=ADAMW_LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)


def runs(args: argparse.Namespace) -> dict[str, Callable[[torch.nn.Module], Any]]:
    rank, gap = args.rank, args.update_every
    return {
        "adamw (torch)": lambda m: torch.optim.AdamW(m.parameters(), lr=ADAMW_LR, betas=(0.9, 0.95), weight_decay=0.0),
        "muon (torch) + adamw": lambda m: Pair(
            torch.optim.Muon(hidden_matrices(m), lr=0.02, weight_decay=0.0),
            torch.optim.AdamW([p for p in m.parameters() if id(p) not in {id(q) for q in hidden_matrices(m)}],
                              lr=ADAMW_LR, betas=(0.9, 0.95), weight_decay=0.0)),
        "galore-torch GaLoreAdamW": lambda m: galore_torch(m, rank, gap),
        "adamw": lambda m: for_model(m, "adamw", lr=ADAMW_LR),
        "muon": lambda m: for_model(m, "muon", lr=0.02, adamw_lr=ADAMW_LR),
        "soap": lambda m: for_model(m, "soap", lr=ADAMW_LR, adamw_lr=ADAMW_LR),
        "shampoo": lambda m: for_model(m, "shampoo", lr=ADAMW_LR, adamw_lr=ADAMW_LR),
        "galore svd": lambda m: for_model(m, "galore", rank=rank, update_every=gap, betas=(0.9, 0.95),
                                          adamw_lr=ADAMW_LR, **GALORE),
        "galore dct": lambda m: for_model(m, "galore", rank=rank, update_every=gap, betas=(0.9, 0.95),
                                          projection="dct", adamw_lr=ADAMW_LR, **GALORE),
        "multinorm": lambda m: for_model(m, "multinorm", lr=ADAMW_LR, adamw_lr=ADAMW_LR),
        "sam (adamw)": lambda m: SAM(m.parameters(), torch.optim.AdamW, rho=0.05, lr=ADAMW_LR, betas=(0.9, 0.95),
                                     weight_decay=0.0),
        "grokfast (adamw)": lambda m: (torch.optim.AdamW(m.parameters(), lr=ADAMW_LR, betas=(0.9, 0.95),
                                                         weight_decay=0.0), Grokfast(m)),
    }


def state_bytes(optimizer: Any, only: set[int] | None = None) -> int:
    """Optimizer-state bytes (of the parameters in ``only`` when given); galore-torch keeps
    its projection matrix inside a projector object, which is counted too."""
    if isinstance(optimizer, Pair):
        return sum(state_bytes(o, only) for o in optimizer.optimizers)
    if isinstance(optimizer, SAM):
        optimizer = optimizer.base_optimizer
    total = 0
    for param, state in optimizer.state.items():
        if only is not None and id(param) not in only:
            continue
        total += sum(v.numel() * v.element_size() for v in state.values()
                     if isinstance(v, torch.Tensor) and v.dim() > 0)
        projector = state.get("projector")
        matrix = getattr(projector, "ortho_matrix", None)
        if isinstance(matrix, torch.Tensor):
            total += matrix.numel() * matrix.element_size()
    return total


def train_one(name: str, build: Callable[[torch.nn.Module], Any], args: argparse.Namespace,
              windows: torch.Tensor, quick: torch.Tensor) -> dict[str, Any]:
    model = build_model(args)
    made = build(model)
    optimizer, grokfast = made if isinstance(made, tuple) else (made, None)
    inner = optimizer.optimizers if isinstance(optimizer, Pair) else [optimizer]
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, warmup_cosine(args.steps, max(1, args.steps // 20)))
                  for o in inner]
    batches = data.byte_batches(data.code_corpus("train"), args.batch, args.seq_len, seed=args.seed, steps=args.steps)
    curve, times, elapsed = [], [], 0.0
    eval_every = max(1, args.steps // args.evals)
    for step, batch in enumerate(batches, 1):
        start = time.perf_counter()
        if isinstance(optimizer, SAM):
            def closure(batch: torch.Tensor = batch) -> torch.Tensor:
                optimizer.zero_grad(set_to_none=True)
                loss = lm_loss(model, batch)
                loss.backward()
                return loss
            optimizer.step(closure)
        else:
            optimizer.zero_grad(set_to_none=True)
            lm_loss(model, batch).backward()
            if grokfast is not None:
                grokfast()
            optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
        times.append(time.perf_counter() - start)
        elapsed += times[-1]
        if step % eval_every == 0 or step == args.steps:
            curve.append((step, round(elapsed, 2), round(bits_per_byte(model, quick), 4)))
    hidden = {id(p) for p in hidden_matrices(model)}
    result = {"name": name, "curve": curve, "ms_per_step": round(1000 * statistics.median(times), 1),
              "train_seconds": round(elapsed, 1), "final_bpb": round(bits_per_byte(model, windows), 4),
              "state_mib": round(state_bytes(optimizer) / 2**20, 3),
              "hidden_state_mib": round(state_bytes(optimizer, hidden) / 2**20, 3)}
    print(json.dumps(result), flush=True)
    return result


def at_time(curve: list[tuple[int, float, float]], seconds: float) -> float | None:
    """Held-out bits/byte at ``seconds`` of training, linearly interpolated (None past the end)."""
    previous = (0, 0.0, None)
    for point in curve:
        if point[1] >= seconds:
            if previous[2] is None:
                return point[2]
            share = (seconds - previous[1]) / max(1e-9, point[1] - previous[1])
            return round(previous[2] + share * (point[2] - previous[2]), 4)
        previous = point
    return None


def first_step_reaching(curve: list[tuple[int, float, float]], target: float) -> int | None:
    return next((step for step, _, bpb in curve if bpb <= target), None)


def train_part(args: argparse.Namespace) -> dict[str, Any]:
    windows = data.eval_windows(data.code_corpus("validation"), args.seq_len, args.eval_windows)
    quick = windows[: args.quick_windows]
    chosen = runs(args)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    results = []
    for name, build in chosen.items():
        try:
            results.append(train_one(name, build, args, windows, quick))
        except ImportError as error:  # galore-torch not installed
            print(f"skipped {name}: {error}", flush=True)
    return finish_train(results)


def finish_train(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Each run against AdamW: bits/byte at AdamW's training time, and the first
    evaluated step at which AdamW's final (quick) bits/byte is reached."""
    reference = next((r for r in results if r["name"] == "adamw (torch)"), results[0])
    target = reference["curve"][-1][2]
    for r in results:
        r["bpb_at_adamw_time"] = at_time(r["curve"], reference["curve"][-1][1])
        r["step_reaching_adamw_final"] = first_step_reaching(r["curve"], target)
    return {"results": results, "adamw_final_quick_bpb": target}


def train_table(part: dict[str, Any], args: argparse.Namespace) -> str:
    results = part["results"]
    steps = [step for step, _, _ in results[0]["curve"]]
    header = ["optimizer", *[f"bpb @ {s}" for s in steps], f"final bpb ({args.eval_windows} win.)",
              "bpb @ AdamW's time", "steps to AdamW's final", "ms/step", "state MiB (hidden)"]
    rows = []
    for r in results:
        curve = {step: bpb for step, _, bpb in r["curve"]}
        reach = r["step_reaching_adamw_final"]
        rows.append([r["name"], *[f"{curve.get(s, float('nan')):.3f}" for s in steps], f"{r['final_bpb']:.4f}",
                     "—" if r["bpb_at_adamw_time"] is None else f"{r['bpb_at_adamw_time']:.3f}",
                     "—" if reach is None else f"{reach} ({reach / args.steps:.2f})", f"{r['ms_per_step']:.0f}",
                     f"{r['state_mib']:.2f} ({r['hidden_state_mib']:.2f})"])
    return markdown_table(header, rows)


def plot(part: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = plt.get_cmap("tab20").colors
    for index, r in enumerate(part["results"]):
        style = "--" if "torch" in r["name"] else "-"
        steps, seconds, bpb = zip(*r["curve"])
        color = colors[(2 * index) % 20 + (2 * index) // 20]  # 12 runs: one colour each
        by_step.plot(steps, bpb, style, label=r["name"], marker=".", color=color)
        by_time.plot(seconds, bpb, style, label=r["name"], marker=".", color=color)
    by_step.set_xlabel("step")
    by_time.set_xlabel("training seconds (shared CPU)")
    by_step.set_ylabel("held-out bits/byte (code)")
    by_time.legend(fontsize=7)
    save_figure(fig, path)


# -- Muon's step ---------------------------------------------------------------------------------
def reference_matrices(seed: int = 0) -> list[torch.Tensor]:
    from spectrakit.reference import reference_config

    c = reference_config()
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["head_dim"]
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)] * c["num_hidden_layers"]
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g) * 0.02 for s in shapes]


def step_part(args: argparse.Namespace) -> dict[str, Any]:
    matrices = reference_matrices()
    grads = [torch.randn_like(m) for m in matrices]

    def make(kind: str) -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]:
        params = [torch.nn.Parameter(m.clone()) for m in matrices]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        if kind == "torch.optim.Muon (bf16)":
            return torch.optim.Muon(params, lr=0.02, weight_decay=0.0), params
        dtype = torch.bfloat16 if "bf16" in kind else None
        return Muon(params, lr=0.02, ns_dtype=dtype, distributed=False), params

    kinds = ["torch.optim.Muon (bf16)", "spectrakit Muon (bf16)", "spectrakit Muon (float32)"]
    built = {k: make(k)[0] for k in kinds}
    for opt in built.values():
        opt.step()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.step_repeats):
        for k in kinds:
            start = time.perf_counter()
            built[k].step()
            times[k].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) * 1000 for k, v in times.items()}
    best = {k: min(v) * 1000 for k, v in times.items()}
    return {"ms": {k: round(v, 1) for k, v in medians.items()}, "best_ms": {k: round(v, 1) for k, v in best.items()},
            "ratio": {k: round(v / medians[kinds[0]], 3) for k, v in medians.items()},
            "best_ratio": {k: round(v / best[kinds[0]], 3) for k, v in best.items()},
            "repeats": args.step_repeats, "matrices": len(matrices)}


def _ddp_worker(rank: int, world: int, port: int, repeats: int, out: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        matrices = reference_matrices()
        params = [torch.nn.Parameter(m.clone()) for m in matrices]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = Muon(params, lr=0.02, distributed=True)
        opt.step()
        times = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - start)
        if rank == 0:
            Path(out).write_text(json.dumps({"world": world, "ms": statistics.median(times) * 1000}))
    finally:
        dist.destroy_process_group()


def ddp_part(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    import torch.multiprocessing as mp

    result = {}
    for world in (1, 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with tempfile.TemporaryDirectory() as folder:
            out = os.path.join(folder, "ddp.json")
            mp.spawn(_ddp_worker, args=(world, port, args.step_repeats, out), nprocs=world, join=True)
            result[world] = round(json.loads(Path(out).read_text())["ms"], 1)
    return {"ms_per_step": result, "speedup": round(result[1] / result[2], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128, help="narrowed width (ignored with --full)")
    parser.add_argument("--layers", type=int, default=2, help="narrowed depth (ignored with --full)")
    parser.add_argument("--full", action="store_true", help="the reference architecture at its full size")
    parser.add_argument("--rank", type=int, default=32, help="GaLore rank (both implementations)")
    parser.add_argument("--update-every", type=int, default=40, help="GaLore projection refresh")
    parser.add_argument("--evals", type=int, default=6, help="held-out evaluations along the way")
    parser.add_argument("--quick-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=128)
    parser.add_argument("--step-repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated run names, e.g. 'adamw (torch),muon'")
    parser.add_argument("--merge", type=Path, nargs="+",
                        help="only merge the training results of earlier --json files (runs split over processes)")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("--skip-ddp", action="store_true")
    parser.add_argument("--json", type=Path, default=Path("docs/benchmarks/optimize.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/img/optimize_bpb.png"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    record: dict[str, Any] = {"machine": machine(), "command": "python bench/optimize.py " + " ".join(sys.argv[1:]),
                              "settings": {k: v for k, v in vars(args).items() if k not in ("json", "plot", "merge")}}
    if args.merge:
        parts = [json.loads(path.read_text()) for path in args.merge]
        record = {**record, "merged_from": [p.get("command") for p in parts]}
        merged = [r for p in parts if "train" in p for r in p["train"]["results"]]
        record["train"] = finish_train(merged)
        record.update({k: v for p in parts for k, v in p.items() if k in ("step", "ddp")})
        print(train_table(record["train"], args))
        plot(record["train"], args.plot)
    elif not args.skip_train:
        record["train"] = train_part(args)
        print(train_table(record["train"], args))
        plot(record["train"], args.plot)
    if not args.skip_step and not args.merge:
        record["step"] = step_part(args)
        step = record["step"]
        print(markdown_table(["optimizer", "median ms/step", "ratio", "best ms/step", "ratio"],
                             [[k, step["ms"][k], step["ratio"][k], step["best_ms"][k], step["best_ratio"][k]]
                              for k in step["ms"]]))
    if not args.skip_ddp and not args.merge:
        record["ddp"] = ddp_part(args)
        print(record["ddp"])
    from spectrakit._atomic import atomic_write

    with atomic_write(args.json) as handle:
        json.dump(record, handle, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
