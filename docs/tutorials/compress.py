"""Tutorial: compress the reference model under one parameter budget, two ways.

Plain truncated SVD keeps each layer's largest singular values; SVD-LLM whitens each
layer by its calibration inputs first, so every dropped singular value is exactly the
output error it adds. Run ``python docs/tutorials/compress.py [OUT_DIR]``.
"""

from __future__ import annotations

from pathlib import Path

from tutorial_output import output_dir, pyplot

import spectrakit as sk
from spectrakit.adapt.train import bits_per_byte


def main(out: Path, ratios: tuple[float, ...] = (0.25, 0.5)) -> dict:
    held_out = sk.data.eval_windows(sk.data.code_corpus("validation"), seq_len=128, max_windows=16)
    dense = sk.reference_model()
    results: dict = {"dense": bits_per_byte(dense, held_out), "reports": {}}
    print(f"dense: {sum(p.numel() for p in dense.parameters()):,} parameters, "
          f"{results['dense']:.4f} bits/byte")
    for method in ("svd", "svd-llm"):
        for ratio in ratios:
            model = sk.reference_model()
            # Calibration: training-split code, never the held-out windows scored below.
            calibration = sk.data.byte_batches(sk.data.code_corpus("train"), batch_size=8, seq_len=128,
                                               seed=0, steps=8) if method != "svd" else None
            report = sk.compress(model, method=method, ratio=ratio, calibration=calibration,
                                 allocation="global")
            bpb = bits_per_byte(model, held_out)
            results["reports"][method, ratio] = (report, bpb, sum(p.numel() for p in model.parameters()))
            print(f"{report}; {bpb:.4f} bits/byte")

    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 3.6))
    for method in ("svd", "svd-llm"):
        axis.plot(ratios, [results["reports"][method, r][1] for r in ratios], marker="o", label=method)
    axis.axhline(results["dense"], color="gray", linestyle=":", label="dense")
    axis.set(xlabel="fraction of the linear layers' parameters removed", ylabel="held-out bits/byte",
             title="global allocation, reference model, code corpus")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "compression.png", dpi=110)
    plt.close(figure)
    return results


if __name__ == "__main__":
    main(output_dir("compress"))
