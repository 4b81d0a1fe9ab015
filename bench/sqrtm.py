"""Matrix square root: spectrakit's Newton–Schulz and Padé against eigh and scipy.linalg.sqrtm, side by side.

Run:  python bench/sqrtm.py                                  (≈ 10 min on 2 shared cores, one thread)
      python bench/sqrtm.py --sides 64 256 1024              (quick look)

For each side ``n`` one symmetric positive-definite matrix ``A = XᵀX / 2n + 10⁻³·I`` (``X`` Gaussian
``2n × n``: eigenvalues spread over a factor of about 30, a sample covariance) is rooted by

* ``eigh``: ``V diag(√λ) Vᵀ`` with ``torch.linalg.eigh`` — the float64 reference;
* ``scipy.linalg.sqrtm`` (Schur method; sides up to ``--scipy-max``: it is the slowest);
* ``sk.linalg.sqrtm`` Newton–Schulz at ``tol=1e-6`` (the error bound the iteration stops at);
* ``sk.linalg.sqrtm(method="pade")`` at the smallest degree of 4, 8, 16, 32 that reaches 1e-6
  (sides up to ``--pade-max``);

in float64, and the float32 pair (eigh vs Newton–Schulz in float32, both judged against the
float64 reference). Each figure is the best of ``--repeats`` runs (one run above 1024); the error
is ``‖S − S_ref‖_F / ‖S_ref‖_F``. Writes ``docs/benchmarks/sqrtm.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import spectrakit as sk  # noqa: E402
from _common import best_of, machine, markdown_table  # noqa: E402
from spectrakit._atomic import atomic_write  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGET = 1e-6


def spd(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    X = torch.randn(2 * n, n, generator=g, dtype=torch.float64)
    return (X.T @ X / (2 * n) + 1e-3 * torch.eye(n, dtype=torch.float64)).to(dtype)


def relative(S: torch.Tensor, reference: torch.Tensor) -> float:
    return float((S.double() - reference).norm() / reference.norm())


def measure(n: int, repeats: int, scipy_max: int, pade_max: int) -> dict:
    A = spd(n)
    reps = repeats if n <= 1024 else 1
    row: dict = {"side": n}
    eigh_root = None

    def run_eigh(A: torch.Tensor = A) -> torch.Tensor:
        return sk.linalg.sqrtm(A, method="eigh")

    row["eigh_s"], _ = best_of(run_eigh, reps)
    eigh_root = run_eigh()
    reference = eigh_root
    S = sk.linalg.sqrtm(A, tol=TARGET)
    row["ns_s"], _ = best_of(lambda: sk.linalg.sqrtm(A, tol=TARGET), reps)
    row["ns_error"] = relative(S, reference)
    for degree in (4, 8, 16, 32) if n <= pade_max else ():
        S = sk.linalg.sqrtm(A, method="pade", degree=degree)
        error = relative(S, reference)
        if error <= TARGET or degree == 32:
            row["pade_degree"], row["pade_error"] = degree, error
            row["pade_s"], _ = best_of(lambda degree=degree: sk.linalg.sqrtm(A, method="pade", degree=degree), reps)
            break
    if n <= scipy_max:
        import scipy.linalg

        array = A.numpy()
        start = time.perf_counter()
        root = scipy.linalg.sqrtm(array)
        row["scipy_s"] = time.perf_counter() - start
        row["scipy_error"] = relative(torch.from_numpy(root.real if hasattr(root, "real") else root), reference)
    A32 = A.float()
    row["eigh32_s"], _ = best_of(lambda: sk.linalg.sqrtm(A32, method="eigh"), reps)
    row["eigh32_error"] = relative(sk.linalg.sqrtm(A32, method="eigh"), reference)
    row["ns32_s"], _ = best_of(lambda: sk.linalg.sqrtm(A32, tol=TARGET), reps)
    row["ns32_error"] = relative(sk.linalg.sqrtm(A32, tol=TARGET), reference)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[64, 256, 1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scipy-max", type=int, default=1024)
    parser.add_argument("--pade-max", type=int, default=1024)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "sqrtm.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for n in args.sides:
        rows.append(measure(n, args.repeats, args.scipy_max, args.pade_max))
        r = rows[-1]
        print(f"n={n}: eigh {r['eigh_s']:.3f}s, NS {r['ns_s']:.3f}s ({r['eigh_s'] / r['ns_s']:.2f}×), "
              f"error {r['ns_error']:.1e}", flush=True)
    print(f"Machine: {machine()}")
    table = []
    for r in rows:
        scipy = f"{r['scipy_s']:.3g} s ({r['scipy_error']:.0e})" if "scipy_s" in r else "–"
        table.append([r["side"], f"{r['eigh_s']:.3g} s", scipy, f"{r['ns_s']:.3g} s ({r['ns_error']:.0e})",
                      round(r["eigh_s"] / r["ns_s"], 2),
                      f"{r['pade_s']:.3g} s (m={r['pade_degree']}, {r['pade_error']:.0e})" if "pade_s" in r else "–",
                      round(r["eigh_s"] / r["pade_s"], 2) if "pade_s" in r else "–",
                      f"{r['eigh32_s']:.3g} s ({r['eigh32_error']:.0e})",
                      f"{r['ns32_s']:.3g} s ({r['ns32_error']:.0e})",
                      round(r["eigh32_s"] / r["ns32_s"], 2)])
    print(markdown_table(["n", "eigh fp64", "scipy sqrtm (error)", "NS fp64 (error)", "eigh ÷ NS",
                          "Padé fp64 (degree, error)", "eigh ÷ Padé", "eigh fp32 (error)", "NS fp32 (error)",
                          "eigh32 ÷ NS32"], table))
    result = {"command": " ".join(["python", "bench/sqrtm.py", *sys.argv[1:]]), "machine": machine(),
              "args": vars(args), "rows": rows}
    with atomic_write(args.out) as handle:
        json.dump(result, handle, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
