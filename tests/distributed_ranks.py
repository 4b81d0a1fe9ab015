"""One torchrun rank of tests/test_compress_distributed.py (not a test module itself).

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed_ranks.py OUT

Every check compares, in this very process (one intra-op thread), the distributed call
with the same call under ``distributed=False``; a failed check raises, so the rank exits
non-zero and the test shows its stderr. Each rank writes ``OUT/rank<r>.json`` with what
the test asserts across ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

import spectrakit as sk
from spectrakit import data
from spectrakit._distributed import decompose_shared, join_torchrun
from spectrakit.compress import LowRankLinear
from spectrakit.compress.api import find_layers
from spectrakit.compress.calibration import collect_statistics
from spectrakit.compress.distributed import collect_shared
from spectrakit.errors import SpectrakitError

torch.set_num_threads(1)
OUT = Path(sys.argv[1])
results: dict[str, object] = {}


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32)).eval()


def token_batches(count: int) -> list[torch.Tensor]:
    """Windows of the code corpus, its bytes folded into the tiny vocabulary."""
    text = data.code_corpus("train", max_bytes=200_000)
    return [b[:, :-1] % 100 for b in data.byte_batches(text, 2, 17, seed=1, steps=count)]


def digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def same_tensors(a: torch.nn.Module, b: torch.nn.Module, *, exact: bool, what: str) -> float:
    """The largest relative difference of the two models' tensors (0.0 when bitwise equal)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), what
    worst = 0.0
    for key in sa:
        x, y = sa[key], sb[key]
        assert x.shape == y.shape and x.dtype == y.dtype, (what, key)
        if exact:
            assert torch.equal(x, y), (what, key)
        elif x.is_floating_point():
            scale = float(x.abs().max()) or 1.0
            worst = max(worst, float((x.double() - y.double()).abs().max()) / scale)
    return worst


def lowrank_products(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: (m.up @ m.down).double() for name, m in model.named_modules()
            if isinstance(m, LowRankLinear)}


# --- 1. the CLI joins the group itself (and leaves it) ----------------------------------------
from spectrakit.cli import main as cli  # noqa: E402

status = cli(["compress", "--method", "svd", "--ratio", "0.3", "--out", str(OUT / "cli-svd"), "--quiet"])
assert status == 0, status
assert dist.is_initialized(), "the CLI did not join the process group"
print("cli compress done", file=sys.stderr, flush=True)
status = cli(["finetune", "--method", "pissa", "--rank", "4", "--steps", "1", "--batch-size", "2", "--seq-len", "16",
              "--eval-windows", "2", "--out", str(OUT / "cli-pissa"), "--quiet"])
assert status == 0, status
print("cli finetune done", file=sys.stderr, flush=True)

rank = join_torchrun()
world = dist.get_world_size()
assert world == 2

# --- 2. calibration statistics: each rank its share, summed = one process ---------------------
batches = token_batches(5)  # odd: rank 0 runs 3 batches, rank 1 two
model = tiny_gpt2()
layers = find_layers(model)
head = model.get_output_embeddings()
wide = {"transformer.h.0.attn.c_proj": layers["transformer.h.0.attn.c_proj"].weight.detach().T}
worst_stat = 0.0
for options in ({"gram": True, "scale": True, "output_gram": wide, "head": head}, {"fisher": True, "kronecker": True}):
    single = collect_statistics(model, layers, batches, **options)
    shared = collect_shared(model, layers, batches, **options)
    assert single.keys() == shared.keys()
    for name in single:
        assert single[name].tokens == shared[name].tokens, name
        for key in ("gram", "output_gram", "abs_sum", "fisher", "row_fisher", "column_fisher"):
            a, b = getattr(single[name], key), getattr(shared[name], key)
            assert (a is None) == (b is None), (name, key)
            if a is not None:
                err = float((a - b).abs().max()) / max(float(a.abs().max()), 1e-300)
                assert err < 1e-12, (name, key, err)
                worst_stat = max(worst_stat, err)
results["statistics_relative_error"] = worst_stat
results["tokens"] = single["transformer.h.0.attn.c_attn"].tokens

print("3.", file=sys.stderr, flush=True)
# --- 3. compress: the same model as one process -------------------------------------------------
cases = [("svd", {"ratio": 0.4}, True), ("svd", {"ratio": 0.4, "allocation": "global"}, True),
         ("svd-llm", {"ratio": 0.4, "calibration": batches}, False),
         ("asvd", {"ratio": 0.3, "calibration": batches}, False),
         ("gfwsvd", {"rank": 4, "calibration": batches}, False),
         ("asvd", {"ratio": 0.3, "calibration": batches, "allocation": "sensitivity"}, False)]
for method, kwargs, exact in cases:
    label = f"{method} {kwargs.get('allocation', 'uniform')}"
    one, many = tiny_gpt2(), tiny_gpt2()
    report_one = sk.compress(one, method, distributed=False, **kwargs)
    report_many = sk.compress(many, method, **kwargs)
    assert report_one.ranks == report_many.ranks, label
    assert report_one.calibration_tokens == report_many.calibration_tokens, label
    err = same_tensors(one, many, exact=exact, what=label)
    products_one, products_many = lowrank_products(one), lowrank_products(many)
    assert products_one.keys() == products_many.keys() and products_one, label
    for name in products_one:
        a, b = products_one[name], products_many[name]
        assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max()), (label, name)
    results[f"compress {label}"] = {"max_relative_difference": err, "digest": digest(many)}

print("4.", file=sys.stderr, flush=True)
# --- 4. adapt's SVD initialization: bitwise the adapters of one process -----------------------
for method in ("pissa", "milora", "svft", "sorsa", "lora"):
    torch.manual_seed(1)
    one = sk.adapt(tiny_gpt2(), method, rank=4, distributed=False)
    torch.manual_seed(1)
    many = sk.adapt(tiny_gpt2(), method, rank=4)
    same_tensors(one, many, exact=True, what=method)
    for (name, a), (_, b) in zip(one.named_buffers(), many.named_buffers()):
        assert torch.equal(a, b), (method, name)
    results[f"adapt {method}"] = digest(many)

print("5.", file=sys.stderr, flush=True)
# --- 5. decompose_shared: results of any structure, bit for bit -------------------------------
matrices = {f"m{i}": torch.randn(20 + 7 * i, 15, generator=torch.Generator().manual_seed(i)) for i in range(5)}
sizes = [W.numel() for W in matrices.values()]
for fn in (lambda n: torch.linalg.svdvals(matrices[n]), lambda n: torch.linalg.svd(matrices[n], full_matrices=False),
           lambda n: {"norm": matrices[n].norm().reshape(1), "first": matrices[n][0]}):
    got = decompose_shared(list(matrices), sizes, fn)
    want = {n: fn(n) for n in matrices}
    for n in matrices:
        a, b = want[n], got[n]
        pairs = (zip(a, b) if isinstance(a, tuple) else zip(a.values(), b.values()) if isinstance(a, dict)
                 else [(a, b)])
        assert all(torch.equal(x, y) for x, y in pairs), n

print("6.", file=sys.stderr, flush=True)
# --- 6. a failure on rank 1 stops both ranks with one line, and nothing is written ------------
failures: dict[str, str] = {}
floats = [torch.randn(4, 12, generator=torch.Generator().manual_seed(i)) for i in range(4)]
floats[1][2, 3] = float("nan")  # batch 1: rank 1's share only
mlp = torch.nn.Sequential(torch.nn.Linear(12, 12), torch.nn.ReLU(), torch.nn.Linear(12, 12))
try:
    report = sk.compress(mlp, "svd-llm", rank=3, calibration=floats)
    if rank == 0:
        sk.save_compressed(mlp, OUT / "never-written", report)
except SpectrakitError as error:
    failures["nan batch"] = str(error)

# a checkpoint split over files, one per matrix; the file of the largest matrix is cut short
folder = OUT / f"shards-rank{rank}"
folder.mkdir()
from safetensors.torch import save_file  # noqa: E402

names = [f"layer{i}" for i in range(4)]
for i, name in enumerate(names):
    save_file({"weight": torch.randn(10 + 10 * i, 8)}, str(folder / f"{name}.safetensors"))
cut = folder / "layer2.safetensors"  # sizes 10..40 by the LPT rule: layer3, layer0 to rank 0; layer2, layer1 to rank 1
cut.write_bytes(cut.read_bytes()[:40])


def load_svdvals(name: str) -> torch.Tensor:
    (record,) = list(sk.weights.iter_matrices(str(folder / f"{name}.safetensors")))
    return torch.linalg.svdvals(record.matrix())


try:
    decompose_shared(names, [10 + 10 * i for i in range(4)], load_svdvals, what="svdvals")
except SpectrakitError as error:
    failures["corrupt file"] = str(error)
results["failures"] = failures
(OUT / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
# both ranks reach the end before either tears the group down: a rank that destroyed its gloo group
# while the other still used it aborted the other ('terminate called without an active exception')
dist.barrier()
dist.destroy_process_group()
# and skip the interpreter's teardown, where a gloo thread still joinable at exit aborted a rank
# now and then ('terminate called without an active exception') after all its work was written
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
