"""Several adapters together, and LQ-LoRA's memory, on the bundled reference model.

Run:  python bench/adapter_merging.py [--steps 60] [--rounds 4] [--local-steps 15] [--json out.json]

Three tables (markdown on stdout, everything to ``--json``):

1. **Merging**: two LoRA adapters (rank 8) trained from the same base, one on the English
   docs corpus and one on held-in Python code (``code_corpus("train")``), merged by every
   ``merge_adapters`` rule and scored on both held-out sets (bits/byte). The same pair
   trained as orthogonal ``asymmetric`` adapters (one seed, slots 0 and 1) and summed.
2. **FedSVD**: the docs corpus split in contiguous shards over ``--clients`` clients; each
   round every client starts from the global adapter and trains ``--local-steps`` steps.
   FedSVD (clients train B only, the server refactors the mean B·A by SVD) against the
   common FedAvg baseline (clients train A and B, the server averages each).
3. **LQ-LoRA**: bytes of the NF4 residual against the dense weights it replaces, and the
   weight error of ``deq(Q) + L`` against plain NF4 of W (QLoRA's starting point), per rank.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import spectrakit as sk  # noqa: E402
from _common import machine, markdown_table  # noqa: E402
from spectrakit import data  # noqa: E402
from spectrakit.adapt import AdaptedLinear, federated_client, federated_round, merge_adapters  # noqa: E402
from spectrakit.adapt.train import bits_per_byte, finetune  # noqa: E402


def corpora(args) -> dict[str, tuple[bytes, torch.Tensor]]:
    """name → (training bytes, held-out windows)."""
    docs_train, code_train = data.docs_corpus("train"), data.code_corpus("train", max_bytes=2_000_000)
    return {
        "docs": (docs_train, data.eval_windows(data.docs_corpus("validation"), args.seq_len, args.windows)),
        "code": (code_train, data.eval_windows(data.code_corpus("validation", max_bytes=400_000), args.seq_len,
                                               args.windows)),
    }


def trained(method: str, train: bytes, args, data_seed: int, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    model = sk.adapt(sk.reference_model(), method, rank=args.rank, **options)
    batches = data.byte_batches(train, args.batch_size, args.seq_len, seed=data_seed, steps=args.steps)
    finetune(model, batches, lr=2e-3)
    return model


def run_merging(args, sets) -> list[dict]:
    scores = {}

    def score(label: str, model: torch.nn.Module) -> None:
        scores[label] = {name: bits_per_byte(model, windows) for name, (_, windows) in sets.items()}
        print(f"  {label:38s} " + "  ".join(f"{k} {v:.3f}" for k, v in scores[label].items()), flush=True)

    score("base model", sk.reference_model())
    docs, code = trained("lora", sets["docs"][0], args, 0), trained("lora", sets["code"][0], args, 1)
    score("LoRA on docs alone", docs)
    score("LoRA on code alone", code)
    rules = [("linear (mean)", "linear", {}), ("task arithmetic (1, 1)", "task-arithmetic", {}),
             ("TIES (density 0.2)", "ties", {}), ("DARE (density 0.5)", "dare", {}),
             ("SVD, rank 8", "svd", {"rank": 8}), ("SVD, rank 16", "svd", {"rank": 16})]
    for label, rule, options in rules:
        start = time.perf_counter()
        merged = merge_adapters(sk.reference_model(), [docs, code], method=rule, **options)
        seconds = time.perf_counter() - start
        score(f"{label} [{seconds:.2f} s]", merged)
    orthogonal = [trained("asymmetric", sets["docs"][0], args, 0, slot=0, seed=11),
                  trained("asymmetric", sets["code"][0], args, 1, slot=1, seed=11)]
    score("asymmetric on docs alone (slot 0)", orthogonal[0])
    score("asymmetric on code alone (slot 1)", orthogonal[1])
    score("orthogonal slots summed", merge_adapters(sk.reference_model(), orthogonal, method="task-arithmetic"))
    names = list(sets)
    print(markdown_table(["adapters (rank 8)"] + [f"{n} bpb" for n in names],
                         [[label] + [f"{v[n]:.3f}" for n in names] for label, v in scores.items()]))
    return [{"run": label, **values} for label, values in scores.items()]


def _fedavg(server: torch.nn.Module, clients: list[torch.nn.Module]) -> None:
    with torch.no_grad():
        for name, layer in server.named_modules():
            if isinstance(layer, AdaptedLinear):
                parts = [dict(c.named_modules())[name] for c in clients]
                layer.lora_A.copy_(sum(p.lora_A for p in parts) / len(parts))
                layer.lora_B.copy_(sum(p.lora_B for p in parts) / len(parts))


def run_federated(args, sets) -> dict:
    train, windows = sets["docs"]
    shard = len(train) // args.clients
    shards = [train[k * shard:(k + 1) * shard] for k in range(args.clients)]
    curves: dict[str, list[float]] = {}
    for label in ("FedSVD (B trained, SVD refactor)", "FedAvg (A and B trained, averaged)"):
        torch.manual_seed(0)
        server = sk.adapt(sk.reference_model(), "lora", rank=args.rank)
        curve = [bits_per_byte(server, windows)]
        for round_ in range(args.rounds):
            clients = []
            for k, data_k in enumerate(shards):
                client = federated_client(server) if label.startswith("FedSVD") else copy.deepcopy(server)
                finetune(client, data.byte_batches(data_k, args.batch_size, args.seq_len, seed=100 * round_ + k,
                                                   steps=args.local_steps), lr=2e-3)
                clients.append(client)
            if label.startswith("FedSVD"):
                federated_round(server, clients)
            else:
                _fedavg(server, clients)
            curve.append(bits_per_byte(server, windows))
        curves[label] = curve
        print(f"  {label:36s} " + " → ".join(f"{v:.3f}" for v in curve), flush=True)
    print(markdown_table(["docs bpb after round"] + [str(r) for r in range(args.rounds + 1)],
                         [[label] + [f"{v:.3f}" for v in curve] for label, curve in curves.items()]))
    return curves


def run_lqlora_memory(args) -> list[dict]:
    from spectrakit.adapt.lqlora import quantize_nf4

    rows = []
    base = sk.reference_model()
    dense = {n: m.weight.detach().float().clone() for n, m in base.named_modules()
             if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    nf4_error = sum(float((quantize_nf4(W).get_original_weight() - W).norm() ** 2) for W in dense.values())
    total = sum(float(W.norm() ** 2) for W in dense.values())
    for rank in args.lq_ranks:
        start = time.perf_counter()
        model = sk.adapt(sk.reference_model(), "lq-lora", rank=rank, iterations=args.lq_iterations)
        seconds = time.perf_counter() - start
        layers = {n: m for n, m in model.named_modules() if getattr(m, "method", "") == "lq-lora"}
        residual = sum(m.residual_bytes() for m in layers.values())
        error = sum(float((m.merged_weight().detach() - dense[n]).norm() ** 2) for n, m in layers.items())
        rows.append({"rank": rank, "layers": len(layers), "dense_fp32_bytes": sum(4 * W.numel() for W in
                                                                                  dense.values()),
                     "dense_bf16_bytes": sum(2 * W.numel() for W in dense.values()), "residual_bytes": residual,
                     "lora_fp32_bytes": 4 * sk.trainable_parameters(model), "relative_error": (error / total) ** 0.5,
                     "plain_nf4_relative_error": (nf4_error / total) ** 0.5, "init_seconds": seconds})
    print(markdown_table(["rank", "dense fp32 KiB", "dense bf16 KiB", "NF4 residual KiB", "A, B fp32 KiB",
                          "‖W − (deq Q + L)‖/‖W‖", "plain NF4 ‖W − deq NF4(W)‖/‖W‖", "init s"],
                         [[r["rank"], f"{r['dense_fp32_bytes'] / 1024:,.0f}", f"{r['dense_bf16_bytes'] / 1024:,.0f}",
                           f"{r['residual_bytes'] / 1024:,.0f}", f"{r['lora_fp32_bytes'] / 1024:,.0f}",
                           f"{r['relative_error']:.4f}", f"{r['plain_nf4_relative_error']:.4f}",
                           f"{r['init_seconds']:.1f}"] for r in rows]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps of each merged adapter")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--windows", type=int, default=48)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=15)
    parser.add_argument("--lq-ranks", type=lambda s: [int(x) for x in s.split(",")], default=[8, 32])
    parser.add_argument("--lq-iterations", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip", type=lambda s: s.split(","), default=[], help="merging,federated,lqlora")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}\n")
    report: dict = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    sets = corpora(args)
    if "merging" not in args.skip:
        print(f"## Merging two adapters ({args.steps} steps each)")
        report["merging"] = run_merging(args, sets)
    if "federated" not in args.skip:
        print(f"\n## FedSVD: {args.clients} clients, {args.rounds} rounds × {args.local_steps} local steps")
        report["federated"] = run_federated(args, sets)
    if "lqlora" not in args.skip:
        print("\n## LQ-LoRA residual memory (28 linear layers of the reference model)")
        report["lqlora"] = run_lqlora_memory(args)
    if args.json:
        from spectrakit._atomic import atomic_write

        with atomic_write(args.json) as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
