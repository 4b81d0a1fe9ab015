"""Tutorial: analyze the bundled reference model and write its report.

Run it with ``python docs/tutorials/analyze.py [OUT_DIR]``; the test suite runs it too.
"""

from __future__ import annotations

from pathlib import Path

from tutorial_output import output_dir, pyplot

import spectrakit as sk


def main(out: Path) -> dict:
    # 1. One call: every weight matrix of the checkpoint, streamed from its safetensors file.
    table = sk.analyze(sk.reference.reference_weights_path())
    print(table.format(max_name=36))

    # 2. The same table as files: CSV and JSON for scripts, HTML for people.
    table.to_csv(out / "spectra.csv")
    table.to_json(out / "spectra.json")
    table.to_html(out / "report.html", title="spectrakit tutorial: the reference model")

    # 3. A figure of our own from the rows: power-law alpha against layer depth.
    rows = table.analyzed
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        mine = [r for r in rows if r["name"].endswith(f"{kind}.weight")]
        depth = [int(r["name"].split(".")[2]) for r in mine]
        axes[0].plot(depth, [r["alpha"] for r in mine], marker="o", label=kind)
        axes[1].plot(depth, [r["stable_rank"] for r in mine], marker="o", label=kind)
    axes[0].set(xlabel="decoder block", ylabel="power-law alpha", title="ESD tail exponent")
    axes[1].set(xlabel="decoder block", ylabel="stable rank", title="‖W‖²_F / σ₁²")
    axes[1].legend(fontsize=7, ncol=2)
    for axis in axes:
        axis.set_xticks(sorted({int(r["name"].split(".")[2]) for r in rows if ".layers." in r["name"]}))
    figure.tight_layout()
    figure.savefig(out / "alpha.png", dpi=110)
    plt.close(figure)

    summary = table.summary()
    print(f"\n{len(rows)} matrices analyzed; mean alpha {summary['mean_alpha']:.3f}")
    return {"table": table, "summary": summary}


if __name__ == "__main__":
    main(output_dir("analyze"))
