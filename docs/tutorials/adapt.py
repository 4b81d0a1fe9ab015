"""Tutorial: fine-tune the reference model on English prose with PiSSA, then merge it.

The bundled model was pretrained on Python code; the English docs corpus is a real
domain shift. PiSSA starts its adapter on the top singular triplets of every linear
layer, so the adapted model equals the base model at step 0. Run
``python docs/tutorials/adapt.py [OUT_DIR]``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tutorial_output import output_dir, pyplot

import spectrakit as sk
from spectrakit.adapt.train import bits_per_byte, finetune


def main(out: Path, steps: int = 48, rank: int = 8) -> dict:
    train_text, held_out = sk.data.docs_corpus("train"), sk.data.docs_corpus("validation")
    windows = sk.data.eval_windows(held_out, seq_len=128, max_windows=16)
    probe = windows[:2, :-1]

    model = sk.reference_model()
    with torch.no_grad():
        base_logits = model(probe).logits
    before = bits_per_byte(model, windows)

    # 1. Adapt in place: every linear layer but the output head gets a rank-8 PiSSA adapter.
    sk.adapt(model, "pissa", rank=rank)
    with torch.no_grad():
        init_gap = float((model(probe).logits - base_logits).abs().max())
    print(f"trainable parameters: {sk.trainable_parameters(model):,}; "
          f"max |logit change| at init: {init_gap:.2e}")

    # 2. Train the adapter only, with the loop the CLI uses.
    batches = sk.data.byte_batches(train_text, batch_size=8, seq_len=128, seed=0, steps=steps)
    log = finetune(model, batches, lr=2e-3, eval_every=steps // 4,
                   evaluate=lambda m: bits_per_byte(m, windows))
    after = bits_per_byte(model, windows)
    print(f"held-out bits per byte: {before:.4f} -> {after:.4f}")

    # 3. Save the adapter, then merge it back into plain nn.Linear layers.
    sk.save_adapter(model, out / "adapter.safetensors")
    with torch.no_grad():
        adapted_logits = model(probe).logits
    sk.merge(model)
    with torch.no_grad():
        merge_gap = float((model(probe).logits - adapted_logits).abs().max())
    print(f"max |logit change| from merging: {merge_gap:.2e}")

    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 3.6))
    axis.plot(log.losses, alpha=0.6, label="training loss (nats/byte)")
    axis.plot(*zip(*log.evals), marker="o", label="held-out bits/byte")
    axis.set(xlabel="step", title="PiSSA r = 8 on the docs corpus")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "loss_curve.png", dpi=110)
    plt.close(figure)
    return {"before": before, "after": after, "init_gap": init_gap, "merge_gap": merge_gap,
            "log": log, "model": model}


if __name__ == "__main__":
    main(output_dir("adapt"))
