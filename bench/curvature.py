#!/usr/bin/env python
"""Curvature benchmark: spectrakit.analyze.hessian against hessian-eigenthings and curvlinops.

Run side by side in one process, on the same model, batch and parameters:

1. time to the top-5 Hessian eigenvalues at equal tolerance (relative Ritz residual
   ``tol``), and each result's error against a tight spectrakit run (tol 1e-6, another
   start vector);
   - spectrakit: Lanczos with full reorthogonalization, stopping once all five pairs
     meet ``tol`` (the batch's gradient graph is kept between products);
   - hessian-eigenthings 1.0.0a5 ``lanczos``: a fixed number of steps and no early
     stop, so it is given the smallest of 10, 15, 20, … steps at which its own
     residuals meet ``tol`` (searched from 10 below spectrakit's count) — an oracle
     choice in its favour; only that run is timed;
   - curvlinops 3.0.1 ``HessianLinearOperator`` + SciPy ``eigsh(k=5, which="LA", tol)``
     (ARPACK, implicit restarts);
2. trace error against the number of products on the reference model's ``lm_head``
   block, whose exact trace has a closed form for cross-entropy,
   ``tr H = (1/N) Σₜ ‖hₜ‖² Σₖ pₜₖ(1 − pₜₖ)``: spectrakit Hutch++ and Hutchinson,
   eigenthings ``hutch_plus_plus``, curvlinops ``hutchpp_trace``.

Models: the bundled reference model (all 3.0 M parameters for the top-5), and a
GPT-2-small-shaped model (768 wide, 12 heads, vocabulary 50257; one layer so it fits the
shared 2-core machine, random seeded weights) restricted to that block (7.1 M parameters). Batch:
code-corpus bytes, ``--batch-size`` × ``--seq-len`` tokens. ``--only`` picks the parts,
``--threads`` the torch threads, and ``--timeout`` bounds each library's top-5 run (a run
past it is recorded as timed out).

    .venv/bin/python bench/curvature.py --out docs/benchmarks/curvature.json
    .venv/bin/python bench/curvature.py --only gpt2 --threads 1 --timeout 600 \
        --out docs/benchmarks/curvature_gpt2.json

curvlinops is not in the ``bench`` extra: its dependency backpack-for-pytorch requires
torchvision, and the PyPI torchvision wheel does not load against the ``+cpu`` torch build
(``operator torchvision::nms does not exist``), which then breaks ``import transformers``.
Install it without dependencies; curvlinops itself never imports torchvision here:

    .venv/bin/pip install --no-deps curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 \
        einconv unfoldNd linear_operator opt-einsum
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import spectrakit as sk  # noqa: E402
from _common import machine  # noqa: E402
from spectrakit import data  # noqa: E402
from spectrakit.analyze.curvature.command import lm_forward  # noqa: E402

F = torch.nn.functional


def lm_mean_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def batch_of(batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    text = data.code_corpus("train", max_bytes=1_000_000)
    return next(data.byte_batches(text, batch_size, seq_len - 1, seed=seed, steps=1))


def reference_setting() -> tuple[torch.nn.Module, str | None]:
    return sk.reference_model().float().eval(), None


def gpt2_setting() -> tuple[torch.nn.Module, str | None]:
    import transformers

    config = transformers.GPT2Config(n_layer=1, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(config).float().eval()
    return model, "transformer.h.0.*"


def param_names(model: torch.nn.Module, glob: str | None) -> list[str]:
    import fnmatch

    return [n for n, p in model.named_parameters()
            if p.requires_grad and (glob is None or fnmatch.fnmatchcase(n, glob))]


class FlatLogits(torch.nn.Module):
    """curvlinops wants an ``nn.Module`` mapping inputs to ``N × C`` logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=ids).logits
        return logits[:, :-1].reshape(-1, logits.shape[-1])


class Timeout(Exception):
    """A library's run went past ``--timeout``."""


@contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Raise :class:`Timeout` inside the block after ``seconds`` (SIGALRM; ``None``: no limit)."""
    if not seconds:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise Timeout(f"timed out after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def bounded(run: Callable[[], dict[str, Any]], seconds: float | None) -> dict[str, Any]:
    """``run()``, or ``{"error": "timed out …"}`` past the deadline."""
    start = time.perf_counter()
    try:
        with deadline(seconds):
            return run()
    except Timeout as error:
        return {"error": str(error), "seconds": time.perf_counter() - start}


def time_top5(model: torch.nn.Module, glob: str | None, ids: torch.Tensor, k: int, tol: float,
              timeout: float | None = None) -> dict[str, Any]:
    import hessian_eigenthings as he

    names = param_names(model, glob)
    params = [p for n, p in model.named_parameters() if n in names]
    n = sum(p.numel() for p in params)
    rows: dict[str, Any] = {"parameters": n}

    def spectrakit_run() -> dict[str, Any]:
        start, cpu = time.perf_counter(), time.process_time()
        h = sk.analyze.hessian(model, lm_mean_loss, [ids], params=names, forward=lm_forward)
        top = h.top(k, tol)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        h.operator.release()
        return {"seconds": seconds, "cpu_seconds": cpu, "products": h.operator.products,
                "values": [float(v) for v in top.values], "converged": top.converged}

    rows["spectrakit"] = bounded(spectrakit_run, timeout)
    if "error" in rows["spectrakit"]:
        return rows

    # another start vector than the timed run's, so the reference is not that run continued
    reference = sk.analyze.hessian(model, lm_mean_loss, [ids], params=names, forward=lm_forward).top(k, 1e-6, seed=1)
    rows["reference"] = {"values": [float(v) for v in reference.values], "steps": reference.steps}

    def eigenthings_loss(m: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return lm_mean_loss(m(input_ids=batch).logits, batch)

    wanted = set(names)
    operator = he.HessianOperator(model, [ids], eigenthings_loss, param_filter=lambda name, p: name in wanted)

    def eigenthings_run(steps: int) -> dict[str, Any]:
        start, cpu = time.perf_counter(), time.process_time()
        result = he.lanczos(operator, k=k, max_iter=steps, tol=tol, which="LA", reorthogonalize=True, seed=0)
        return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu, "products": steps,
                "converged": bool(result.converged.all()), "values": [float(v) for v in result.eigenvalues]}

    # it has no early stop: its smallest converging step count near spectrakit's, in steps of 5
    # (first spectrakit's own count, then one try below if that converged, else up to three above)
    base = max(2 * k, rows["spectrakit"]["products"])
    tried = [bounded(lambda: eigenthings_run(base), timeout)]
    if tried[-1].get("converged"):
        below = bounded(lambda: eigenthings_run(max(2 * k, base - 5)), timeout)
        if below.get("converged"):
            tried.append(below)
    else:
        for steps in (base + 5, base + 10, base + 15):
            if "error" in tried[-1]:
                break
            tried.append(bounded(lambda steps=steps: eigenthings_run(steps), timeout))
            if tried[-1].get("converged"):
                break
    rows["hessian-eigenthings"] = tried[-1]
    rows["hessian-eigenthings"]["tried_steps"] = [t.get("products") for t in tried]

    rows["curvlinops"] = bounded(lambda: _curvlinops_top(model, params, ids, k, tol), timeout)
    for name in ("spectrakit", "hessian-eigenthings", "curvlinops"):
        if "error" in rows[name]:
            continue
        got, ref = rows[name]["values"], rows["reference"]["values"]
        rows[name]["max_rel_error"] = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
    return rows


def _curvlinops_top(model: torch.nn.Module, params: list[torch.nn.Parameter], ids: torch.Tensor, k: int,
                    tol: float) -> dict[str, Any]:
    import scipy.sparse.linalg
    from curvlinops import HessianLinearOperator

    calls = {"n": 0}
    start, cpu = time.perf_counter(), time.process_time()
    try:
        H = HessianLinearOperator(FlatLogits(model), torch.nn.CrossEntropyLoss(), params,
                                  [(ids, ids[:, 1:].reshape(-1))], check_deterministic=False,
                                  batch_size_fn=lambda x: x.shape[0] * (x.shape[1] - 1))
        scipy_op = H.to_scipy()

        def counted(v: Any) -> Any:
            calls["n"] += 1
            return scipy_op.matvec(v)

        wrapped = scipy.sparse.linalg.LinearOperator(scipy_op.shape, matvec=counted, dtype=scipy_op.dtype)
        values = scipy.sparse.linalg.eigsh(wrapped, k=k, which="LA", tol=tol, return_eigenvectors=False)
    except (NotImplementedError, RuntimeError) as error:  # e.g. no forward-mode rule for an activation
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu, "products": calls["n"],
            "values": sorted((float(v) for v in values), reverse=True), "converged": True}


def lm_head_exact_trace(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """``tr ∇²_W CE`` for ``logits = W h``: ``(1/N) Σₜ ‖hₜ‖² Σₖ pₜₖ(1 − pₜₖ)``."""
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        h = out.hidden_states[-1][:, :-1].reshape(-1, out.hidden_states[-1].shape[-1]).double()
        p = out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).double().softmax(-1)
        return float((h.square().sum(-1) * (p * (1 - p)).sum(-1)).mean())


def trace_errors(model: torch.nn.Module, ids: torch.Tensor, probes: list[int], seeds: int) -> dict[str, Any]:
    import hessian_eigenthings as he
    from curvlinops import HessianLinearOperator
    from curvlinops import hutchpp_trace as curvlinops_hutchpp

    exact = lm_head_exact_trace(model, ids)
    h = sk.analyze.hessian(model, lm_mean_loss, [ids], params="lm_head.weight", forward=lm_forward)
    operator = he.HessianOperator(model, [ids], lambda m, b: lm_mean_loss(m(input_ids=b).logits, b),
                                  param_filter=lambda name, p: name == "lm_head.weight")
    H = HessianLinearOperator(FlatLogits(model), torch.nn.CrossEntropyLoss(),
                              [model.lm_head.weight], [(ids, ids[:, 1:].reshape(-1))], check_deterministic=False,
                              batch_size_fn=lambda x: x.shape[0] * (x.shape[1] - 1))
    results: dict[str, Any] = {"exact": exact, "n": h.size, "rows": []}
    for m in probes:
        for seed in range(seeds):
            row = {"probes": m, "seed": seed}
            row["spectrakit hutch++"] = h.trace(m, "hutch++", seed=seed).value
            row["spectrakit hutchinson"] = h.trace(m, "hutchinson", seed=seed).value
            row["eigenthings hutch++"] = float(he.hutch_plus_plus(operator, num_matvecs=m, seed=seed).estimate)
            torch.manual_seed(seed)
            try:
                row["curvlinops hutchpp"] = float(curvlinops_hutchpp(H, num_matvecs=m))
            except (NotImplementedError, RuntimeError) as error:
                results["curvlinops_error"] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
                row["curvlinops hutchpp"] = math.nan
            results["rows"].append(row)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--probes", type=int, nargs="+", default=[9, 30, 90])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--only", nargs="+", choices=["reference", "trace", "gpt2"],
                        default=["reference", "trace", "gpt2"], help="parts to run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per library's top-5 run")
    parser.add_argument("--out", default="curvature.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ids = batch_of(args.batch_size, args.seq_len, seed=0)
    report: dict[str, Any] = {"machine": machine(), "command": " ".join(sys.argv), "tol": args.tol,
                              "batch": [args.batch_size, args.seq_len], "timeout": args.timeout}
    # the fused attention kernels have no double backward: every library runs on the math kernel
    with sdpa_kernel([SDPBackend.MATH]):
        if "reference" in args.only or "trace" in args.only:
            model, glob = reference_setting()
            if "reference" in args.only:
                label = "reference model (all parameters)"
                report[label] = time_top5(model, glob, ids, 5, args.tol, args.timeout)
                print(label, json.dumps(report[label], indent=1), flush=True)
            if "trace" in args.only:
                report["trace"] = trace_errors(model, ids, args.probes, args.seeds)
                print(json.dumps(report["trace"], indent=1), flush=True)
            del model
        if "gpt2" in args.only:
            model, glob = gpt2_setting()
            label = "GPT-2-small-shaped, block 0"
            report[label] = time_top5(model, glob, ids, 5, args.tol, args.timeout)
            print(label, json.dumps(report[label], indent=1), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    summarize(report)


def summarize(report: dict[str, Any]) -> None:
    for label, rows in report.items():
        if not isinstance(rows, dict) or "spectrakit" not in rows:
            continue
        base = rows["spectrakit"]["seconds"]
        for name in ("spectrakit", "hessian-eigenthings", "curvlinops"):
            r = rows.get(name)
            if r is None:
                continue
            if "error" in r:
                print(f"{label:36s} {name:20s} failed: {r['error']}")
                continue
            cpu = (f"  cpu {r['cpu_seconds']:8.1f} s {r['cpu_seconds'] / rows['spectrakit']['cpu_seconds']:5.2f}×"
                   if "cpu_seconds" in r and "cpu_seconds" in rows["spectrakit"] else "")
            print(f"{label:36s} {name:20s} {r['seconds']:8.1f} s  {r['products']:4d} products  "
                  f"{r['seconds'] / base:5.2f}×{cpu}  max rel err {r['max_rel_error']:.1e}")
    trace = report.get("trace")
    if trace:
        exact = trace["exact"]
        methods = [k for k in trace["rows"][0] if k not in ("probes", "seed")]
        for m in sorted({r["probes"] for r in trace["rows"]}):
            cells = []
            for method in methods:
                errs = [abs(r[method] - exact) / abs(exact) for r in trace["rows"] if r["probes"] == m]
                cells.append(f"{method} {sum(errs) / len(errs):.2e}")
            print(f"trace, {m:4d} products: " + "; ".join(cells))


if __name__ == "__main__":
    main()
