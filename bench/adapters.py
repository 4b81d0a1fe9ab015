"""Every spectrakit adapter vs PEFT LoRA, PEFT PiSSA and full fine-tuning, at one budget.

Run:  python bench/adapters.py [--steps 120] [--rank 8] [--only lora,pissa] [--skip-init] [--skip-step]

Three parts, each printing a markdown table (and everything to ``--json``):

1. **Fine-tuning** the bundled reference model (byte-level Llama pretrained on Python
   code) on the English docs corpus: every method at ``--rank`` plus PEFT LoRA,
   PEFT PiSSA (``pissa_niter_4``) and full fine-tuning, same data, steps, batch and
   seed. Each run is a fresh process (so its peak RSS is its own). Recorded: held-out
   bits/byte after fixed step counts, trainable parameters, median step time, peak RSS.
   The loss curves go to ``--plot`` (PNG).
2. **PiSSA initialization** on a GPT-2-small-shaped model (random init, 768 wide):
   ``spectrakit.adapt(model, "pissa")`` (exact-quality top-r factors) vs PEFT's
   ``init_lora_weights="pissa_niter_4"``, wall time and the residual's distance to the
   Eckart–Young optimum.
3. **Training step** of the LoRA-shaped methods vs PEFT LoRA at the same rank on the
   GPT-2-small-shaped model, and merged-model inference vs the base model.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import json
import math
import multiprocessing
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import spectrakit as sk  # noqa: E402
from _common import best_of, machine, markdown_table, save_figure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# (label, kind, method, options); kind: "sk" | "peft" | "full"
RUNS = [
    ("lora", "sk", "lora", {}),
    ("pissa", "sk", "pissa", {}),
    ("milora", "sk", "milora", {}),
    ("soma", "sk", "soma", {"freeze_blocks": 1}),
    ("svfit", "sk", "svfit", {}),
    ("svfit r=96", "sk", "svfit", {"rank": 96}),
    ("svft banded", "sk", "svft", {"pattern": "banded", "width": 2}),
    ("sorsa", "sk", "sorsa", {}),
    ("salt", "sk", "salt", {}),
    ("eva", "sk", "eva", {}),
    ("spectral", "sk", "spectral", {}),
    ("spectral rot", "sk", "spectral", {"variant": "rotational", "rank": 32}),
    ("hra", "sk", "hra", {}),
    ("fourierft", "sk", "fourierft", {}),
    ("asymmetric", "sk", "asymmetric", {}),
    ("lorma", "sk", "lorma", {}),
    ("qgoft", "sk", "qgoft", {"rank": 1}),
    ("ba-lora", "sk", "ba-lora", {}),
    ("sst", "sk", "sst", {}),
    ("sara", "sk", "sara", {}),
    ("soda", "sk", "soda", {}),
    ("soda stiefel", "sk", "soda", {"orthogonal": "stiefel"}),
    ("dota", "sk", "dota", {}),
    ("clover", "sk", "clover", {}),
    ("lq-lora", "sk", "lq-lora", {}),
    ("peft lora", "peft", "lora", {}),
    ("peft pissa", "peft", "pissa_niter_4", {}),
    ("full", "full", "full", {}),
]
SORSA_GAMMA = 4e-4
#: adapter_penalty weights: SORSA's γ, qGOFT's soft orthogonality, SaRA's nuclear norm (BA-LoRA: BALORA_WEIGHT)
PENALTY = {"sorsa": SORSA_GAMMA, "qgoft": 1e-3, "sara": 1e-4}
SST_ROUND = 25  # steps between SST's re-drawn singular vectors
BALORA_WEIGHT = 1e-3  # on BA-LoRA's output_penalty (its three terms weighted 1 : 1 : 1)


def _sst_rounds(model, batches, every: int, optimizer):
    """Feed ``batches`` and end an SST round every ``every`` of them (between optimizer steps),
    clearing the optimizer state of the re-drawn vectors."""
    from spectrakit.adapt.sst import resample_vectors

    for index, batch in enumerate(batches):
        if index and index % every == 0:
            resample_vectors(model, optimizer)
        yield batch


def _sara_progressive(model, batches, at: int, optimizer):
    """Feed ``batches`` and run SaRA's progressive re-selection once, after ``at`` of them."""
    from spectrakit.adapt.sara import reselect_parameters

    for index, batch in enumerate(batches):
        if index == at:
            kept = reselect_parameters(model, optimizer)
            print(f"  sara: re-selection at step {at} keeps {kept:,} entries training", flush=True)
        yield batch


def _balora_loss(weight: float):
    """Next-byte loss plus BA-LoRA's regularizers on the model's logits (one no-grad forward
    of the same model with the updates off gives the pretrained logits)."""
    from spectrakit.adapt.balora import adapters_off, output_penalty

    def loss_fn(model, batch):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model(inputs).logits
        with torch.no_grad(), adapters_off(model):
            base_logits = model(inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        return loss + weight * output_penalty(model, logits, base_logits)

    return loss_fn


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def finetune_run(label: str, kind: str, method: str, options: dict, rank: int, steps: int,
                 eval_at: list[int], batch_size: int, seq_len: int, windows: int, threads: int) -> dict:
    """One fine-tuning run (meant for a fresh process)."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    from spectrakit import data
    from spectrakit.adapt.train import DEFAULT_LR, bits_per_byte, finetune

    torch.manual_seed(0)
    model = sk.reference_model()
    train = data.docs_corpus("train")
    heldout = data.eval_windows(data.docs_corpus("validation"), seq_len, windows)
    options = dict(options)
    run_rank = options.pop("rank", rank)
    start = time.perf_counter()
    if kind == "sk":
        if method == "eva":
            options["calibration"] = [b[:, :-1] for b in data.byte_batches(train, batch_size, seq_len, seed=1,
                                                                          steps=4)]
        sk.adapt(model, method, rank=run_rank, **options)
        lr = DEFAULT_LR[method]
    elif kind == "peft":
        import peft

        config = peft.LoraConfig(r=run_rank, lora_alpha=run_rank, target_modules=LLAMA_TARGETS, lora_dropout=0.0,
                                 init_lora_weights=True if method == "lora" else method)
        model = peft.get_peft_model(model, config)
        lr = DEFAULT_LR["lora"]
    else:
        lr = DEFAULT_LR["full"]
    init_seconds = time.perf_counter() - start
    trainable = sk.trainable_parameters(model)
    curve = [(0, bits_per_byte(model, heldout))]
    rss_before = _rss_mib()
    batches = data.byte_batches(train, batch_size, seq_len, seed=0, steps=steps)
    if options.get("orthogonal") == "stiefel":  # SODA's factors on the orthogonal group, the rest by AdamW
        from spectrakit.adapt.soda import stiefel_optimizer

        optimizer = stiefel_optimizer(model, lr=lr, adamw_lr=lr)
    else:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    if method == "sst":
        batches = _sst_rounds(model, batches, SST_ROUND, optimizer)
    if method == "sara":
        batches = _sara_progressive(model, batches, steps // 2, optimizer)
    loss_fn = _balora_loss(BALORA_WEIGHT) if method == "ba-lora" else None
    log = finetune(model, batches, lr, penalty_weight=PENALTY.get(method, 0.0) if kind == "sk" else 0.0,
                   eval_every=1, evaluate=_evaluator(heldout, eval_at, bits_per_byte), optimizer=optimizer,
                   loss_fn=loss_fn)
    curve += [(s, v) for s, v in log.evals if v is not None]
    return {
        "label": label, "kind": kind, "method": method, "rank": run_rank, "lr": lr,
        "trainable": trainable, "init_seconds": init_seconds,
        "step_seconds": statistics.median(log.step_seconds[3:] or log.step_seconds),
        "peak_rss_mib": _rss_mib(), "train_rss_growth_mib": _rss_mib() - rss_before,
        "curve": curve, "train_loss": log.losses,
    }


def _evaluator(heldout, eval_at, bits_per_byte):
    counter = {"step": 0}
    wanted = set(eval_at)

    def evaluate(model):
        counter["step"] += 1
        return bits_per_byte(model, heldout) if counter["step"] in wanted else None

    return evaluate


def run_finetuning(args) -> list[dict]:
    eval_at = sorted({s for s in (10, 25, 50, args.steps // 2, args.steps) if 0 < s <= args.steps})
    runs = [r for r in RUNS if not args.only or r[0] in args.only or r[2] in args.only]
    results = []
    context = multiprocessing.get_context("spawn")
    for label, kind, method, options in runs:
        try:
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
                result = pool.submit(finetune_run, label, kind, method, options, args.rank, args.steps, eval_at,
                                     args.batch_size, args.seq_len, args.windows, args.threads).result()
        except Exception as error:  # report and go on with the other methods
            print(f"  {label:14s} FAILED: {str(error).splitlines()[0]}", flush=True)
            continue
        results.append(result)
        print(f"  {label:14s} bpb {result['curve'][0][1]:.3f} -> {result['curve'][-1][1]:.3f}  "
              f"{result['trainable']:>9,} params  {1e3 * result['step_seconds']:.0f} ms/step", flush=True)
    header = ["method", "rank", "lr", "trainable"] + [f"bpb@{s}" for s, _ in results[0]["curve"]] + \
        ["ms/step", "peak RSS MiB", "init s"]
    rows = [[r["label"], r["rank"], r["lr"], f"{r['trainable']:,}"] + [round(v, 3) for _, v in r["curve"]] +
            [round(1e3 * r["step_seconds"]), round(r["peak_rss_mib"]), round(r["init_seconds"], 2)]
            for r in results]
    print(markdown_table(header, rows))
    return results


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        steps, values = zip(*r["curve"])
        style = "--" if r["kind"] != "sk" else "-"
        ax.plot(steps, values, style, marker="o", markersize=3, label=f"{r['label']} ({r['trainable']:,})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out bits/byte (docs)")
    ax.set_title("Fine-tuning the reference model on English docs (legend: trainable parameters)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def gpt2_small(layers: int = 12, width: int = 768, vocab: int = 50257):
    """A randomly initialized GPT-2 (GPT-2-small's shape by default; smaller for quick step timing)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=width, n_head=max(1, width // 64),
                                      vocab_size=vocab)).eval()


def _quality(originals: dict[str, torch.Tensor], residuals: dict[str, torch.Tensor], rank: int
             ) -> tuple[float, float]:
    """(max ‖W_res‖_F / Eckart–Young optimum, min fraction of the top-r energy Σσᵢ² (i ≤ r)
    that the removed rank-r part holds), float64 ground truth, over the sampled layers."""
    worst_residual, worst_energy = 0.0, 1.0
    for name, W in originals.items():
        W = W.double()
        S = torch.linalg.svdvals(W)
        optimum = math.sqrt(float((S[rank:] ** 2).sum()))
        removed = W - residuals[name].double()
        worst_residual = max(worst_residual, float(residuals[name].double().norm()) / optimum)
        worst_energy = min(worst_energy, float(removed.norm() ** 2) / float((S[:rank] ** 2).sum()))
    return worst_residual, worst_energy


def run_pissa_init(args) -> dict:
    """PiSSA initialization of every Conv1D layer: spectrakit (block Krylov default, and the
    exact Gram eigensolve) against PEFT's ``pissa_niter_K`` at K = 4 (its documented fast
    setting) and at larger K, so that time can be read at matched quality too."""
    import peft

    warnings.filterwarnings("ignore")
    rank = args.init_rank
    base = gpt2_small()
    targets = ["c_attn", "c_proj", "c_fc"]
    names = [n for n, m in base.named_modules() if type(m).__name__ == "Conv1D"]
    check = names[:: max(1, len(names) // 8)]  # ground-truth SVDs on a sample of layers
    originals = {n: base.get_submodule(n).weight.detach().T.clone() for n in check}

    def ours(svd_method):
        return lambda: sk.adapt(copy.deepcopy(base), "pissa", rank=rank, svd_method=svd_method)

    def theirs(niter):
        def build():
            config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, fan_in_fan_out=True,
                                     init_lora_weights=f"pissa_niter_{niter}")
            return peft.get_peft_model(copy.deepcopy(base), config)
        return build

    def residuals_of(model) -> dict[str, torch.Tensor]:
        inner = model.base_model.model if isinstance(model, peft.PeftModel) else model
        return {n: inner.get_submodule(n).base_layer.weight.detach().T for n in check}

    runs = [("spectrakit pissa (default: block Krylov, 5 iterations)", ours("krylov")),
            ("spectrakit pissa (svd_method='gram': exact eigensolve)", ours("gram")),
            ("PEFT pissa_niter_4", theirs(4)),
            ("PEFT pissa_niter_8", theirs(8)),
            ("PEFT pissa_niter_16", theirs(16))]
    copy_time, _ = best_of(lambda: copy.deepcopy(base), 2)
    rows = []
    for label, build in runs:  # interleaved per repeat would mix caches; each gets best-of-N
        seconds, _ = best_of(build, args.repeats)
        model = build()
        residual, energy = _quality(originals, residuals_of(model), rank)
        del model
        rows.append({"run": label, "seconds": seconds - copy_time,
                     "residual_vs_optimum": residual, "topr_energy": energy})
    reference = rows[2]["seconds"]
    print(markdown_table([f"PiSSA init (GPT-2-small shape, r={rank}, {len(names)} layers)", "seconds",
                          "× PEFT pissa_niter_4", "max residual / Eckart–Young", "min top-r energy captured"],
                         [[r["run"], f"{r['seconds']:.2f}", f"{r['seconds'] / reference:.2f}",
                           f"{r['residual_vs_optimum']:.6f}", f"{r['topr_energy']:.4f}"] for r in rows]))
    return {"rank": rank, "layers": len(names), "deepcopy_seconds": copy_time, "runs": rows}


def run_step_time(args) -> dict:
    import peft

    warnings.filterwarnings("ignore")
    rank = args.init_rank
    base = gpt2_small(args.step_layers, args.step_width, args.step_vocab)
    tokens = torch.randint(0, args.step_vocab, (args.step_batch, args.step_seq + 1),
                           generator=torch.Generator().manual_seed(0))

    def stepper(model, penalty: str | None = None, weight: float = 0.0):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        model.train()

        def step():
            optimizer.zero_grad(set_to_none=True)
            out = model(tokens[:, :-1], labels=tokens[:, :-1])
            loss = out.loss
            if penalty == "output":  # BA-LoRA's regularizers on the logits: one more forward, no grad
                from spectrakit.adapt.balora import adapters_off, output_penalty

                with torch.no_grad(), adapters_off(model):
                    base_logits = model(tokens[:, :-1]).logits
                loss = loss + weight * output_penalty(model, out.logits, base_logits)
            elif penalty == "adapter":
                loss = loss + weight * sk.adapter_penalty(model)
            loss.backward()
            optimizer.step()

        step()  # warm-up (allocates optimizer state)
        return step

    models = {
        "PEFT lora": lambda: peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=rank, lora_alpha=rank, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
            lora_dropout=0.0)),
    }
    methods = args.step_methods or ("lora", "pissa", "milora", "eva", "svfit", "sorsa")
    penalties: dict[str, tuple[str, float]] = {}
    for entry in methods:
        # "ba-lora+output": with its output penalty; "sara+adapter": with its adapter_penalty
        method, _, penalty = entry.partition("+")
        options: dict = {"calibration": [tokens[:1, :64]]} if method == "eva" else {}
        method_rank = 1 if method == "qgoft" else rank  # qGOFT's rank counts sweeps of d − 1 rotations
        label = f"spectrakit {method}" + (f" (+{penalty} penalty)" if penalty else "")
        models[label] = (lambda m=method, o=options, r=method_rank:
                         sk.adapt(copy.deepcopy(base), m, rank=r, **o))
        if penalty:
            penalties[label] = (penalty, BALORA_WEIGHT if penalty == "output" else PENALTY.get(method, 1e-3))
    steps = {label: stepper(build(), *penalties.get(label, (None, 0.0))) for label, build in models.items()}
    # interleaved rounds: a load spike on the shared machine hits every method alike
    times = {label: float("inf") for label in steps}
    clock = time.thread_time if args.step_clock == "thread" else time.perf_counter
    for _ in range(args.repeats):
        for label, step in steps.items():
            start = clock()
            step()
            times[label] = min(times[label], clock() - start)
    reference = times["PEFT lora"]
    rows = [[label, round(t, 3), round(t / reference, 3)] for label, t in times.items()]
    print(markdown_table([f"train step (GPT-2 shape {args.step_layers}×{args.step_width}, vocab {args.step_vocab}, "
                          f"r={rank}, batch {args.step_batch}×{args.step_seq})",
                          f"seconds (best, {args.step_clock} clock)", "× PEFT LoRA"], rows))

    # merged inference: same modules, same cost as the base model
    merged = sk.merge(sk.adapt(copy.deepcopy(base), "pissa", rank=rank))
    same_types = [type(m) for m in merged.modules()] == [type(m) for m in base.modules()]
    with torch.no_grad():
        t_base = best_of(lambda: base(tokens[:, :-1]), args.repeats)[0]
        t_merged = best_of(lambda: merged(tokens[:, :-1]), args.repeats)[0]
    print(f"merged inference: {t_merged:.4f} s vs base {t_base:.4f} s (ratio {t_merged / t_base:.3f}); "
          f"module types identical: {same_types}")
    return {"step_seconds": times, "merged_forward_seconds": t_merged, "base_forward_seconds": t_base,
            "merged_module_types_identical": same_types}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--windows", type=int, default=48, help="held-out evaluation windows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", type=lambda s: s.split(","), help="comma-separated labels or methods")
    parser.add_argument("--init-rank", type=int, default=16, help="rank for the GPT-2-small parts")
    parser.add_argument("--step-batch", type=int, default=2)
    parser.add_argument("--step-seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step-layers", type=int, default=12, help="part 3's GPT-2 depth (12: GPT-2 small)")
    parser.add_argument("--step-width", type=int, default=768, help="part 3's GPT-2 width (768: GPT-2 small)")
    parser.add_argument("--step-vocab", type=int, default=50257, help="part 3's vocabulary (a small one keeps the "
                        "head from hiding the adapters' cost)")
    parser.add_argument("--step-methods", type=lambda s: s.split(","), default=None,
                        help="spectrakit methods timed in part 3 (default: the LoRA-shaped first-half ones)")
    parser.add_argument("--step-clock", choices=("wall", "thread"), default="wall",
                        help="part 3's clock: wall time, or the thread's CPU time (with --threads 1, steadier "
                        "on a machine that other jobs load)")
    parser.add_argument("--skip-finetune", action="store_true")
    parser.add_argument("--skip-init", action="store_true")
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "adapters_loss.png")
    parser.add_argument("--json", type=Path, default=None, help="write all figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}\n")
    report: dict = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    if not args.skip_finetune:
        print(f"## Fine-tuning the reference model ({args.steps} steps, batch {args.batch_size}×{args.seq_len})")
        report["finetune"] = run_finetuning(args)
        plot(report["finetune"], args.plot)
        print(f"wrote {args.plot}\n")
    if not args.skip_init:
        print("## PiSSA initialization")
        report["pissa_init"] = run_pissa_init(args)
        print()
    if not args.skip_step:
        print("## Training step and merged inference")
        report["step"] = run_step_time(args)
    if args.json:
        from spectrakit._atomic import atomic_write

        with atomic_write(args.json) as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
