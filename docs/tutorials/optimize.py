"""Tutorial: train a small byte-level Llama from scratch with Muon, against AdamW.

``sk.optimize.for_model(model, "muon")`` builds one optimizer for the whole model: the
hidden weight matrices get Muon's orthogonalized momentum, and the embeddings, output
head and norms get AdamW. Both runs below start from the same seeded initialization and
see the same batches. Run ``python docs/tutorials/optimize.py [OUT_DIR]``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from tutorial_output import output_dir, pyplot

import spectrakit as sk
from spectrakit.adapt.train import bits_per_byte, lm_loss


def small_llama(seed: int = 0) -> torch.nn.Module:
    """The reference architecture, shrunk so that this tutorial trains in seconds."""
    config = dict(sk.reference.reference_config(), hidden_size=128, intermediate_size=344,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig.from_dict(config)).float().train()


def train(method: str, lr: float, steps: int) -> dict:
    model = small_llama()
    optimizer = sk.optimize.for_model(model, method, lr=lr, adamw_lr=3e-3)
    batches = sk.data.byte_batches(sk.data.code_corpus("train", max_bytes=2_000_000), batch_size=8,
                                   seq_len=64, seed=0, steps=steps)
    losses = []
    for batch in batches:
        optimizer.zero_grad()
        loss = lm_loss(model, batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    held_out = sk.data.eval_windows(sk.data.code_corpus("validation"), seq_len=64, max_windows=32)
    return {"losses": losses, "bits_per_byte": bits_per_byte(model, held_out), "optimizer": optimizer,
            "model": model}


def main(out: Path, steps: int = 40) -> dict:
    runs = {"adamw": train("adamw", 3e-3, steps), "muon": train("muon", 0.02, steps)}
    print(runs["muon"]["optimizer"].describe())
    print()
    for name, run in runs.items():
        print(f"{name}: loss {run['losses'][0]:.3f} -> {run['losses'][-1]:.3f}; "
              f"held-out {run['bits_per_byte']:.4f} bits/byte after {steps} steps")

    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 3.6))
    for name, run in runs.items():
        axis.plot(run["losses"], label=name)
    axis.set(xlabel="step", ylabel="training loss (nats/byte)", title="from scratch on the stdlib code corpus")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "loss_curves.png", dpi=110)
    plt.close(figure)
    return runs


if __name__ == "__main__":
    main(output_dir("optimize"))
