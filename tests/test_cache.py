"""The spectrum cache shared by analyze, adapt and compress (``sk.SpectrumCache``, ``cache=``, ``--cache``).

Ground truths: the same call without a cache (a cached run must give its table, adapter
tensors and compressed weights bit for bit), the leading/trailing triplets of the stored
entry (k' ≤ k), and the files a killed writer leaves behind, made by hand: a temporary file
cut short, a complete shard the index does not list, a shard or an index cut short.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch

import spectrakit as sk
from spectrakit.adapt.base import fingerprint, get_method, singular_factors
from spectrakit.adapt.low_memory import init_from_checkpoint
from spectrakit.cache import CacheWarning, content_fingerprint, use_cache
from spectrakit.compress.base import CompressionWarning
from spectrakit.errors import SpectrakitError

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.ReLU(), torch.nn.Linear(40, 32),
                               torch.nn.ReLU(), torch.nn.Linear(32, 16))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _assert_bitwise(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys() and want
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


def _adapted(method: str, cache=None, rank: int = 4, seed: int = 0, **options) -> dict[str, torch.Tensor]:
    """Every tensor of the adapted model (adapters, and the residual base of the methods that rewrite it)."""
    model = _model(seed)
    torch.manual_seed(7)
    return _state(sk.adapt(model, method, rank=rank, cache=cache, **options))


def _shards(folder: Path) -> list[Path]:
    return sorted((folder / "shards").glob("*/*.safetensors"))


def _cache_lines(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, CacheWarning)]


# ----- the three verbs: cached == uncached, second run served from the cache ------------------------

def test_analyze_cached_table_equals_uncached(tmp_path):
    want = sk.analyze(_model(), farms=True)
    cold, warm = sk.SpectrumCache(tmp_path), sk.SpectrumCache(tmp_path)
    first = sk.analyze(_model(), farms=True, cache=cold)
    second = sk.analyze(_model(), farms=True, cache=str(tmp_path))  # a folder path opens one too
    again = sk.analyze(_model(), farms=True, cache=warm)
    assert repr(first.rows) == repr(want.rows) == repr(second.rows) == repr(again.rows)  # NaN-safe, every column
    assert cold.stats.misses == 3 and cold.stats.writes == 3 and cold.stats.hits == 0
    assert warm.stats.hits == 3 and warm.stats.misses == 0 and warm.stats.writes == 0 and len(warm) == 3


@pytest.mark.parametrize("svd_method", ["auto", "exact"])  # auto: the float64 Gram path (one side kept)
def test_compress_svd_cached_weights_equal_uncached(tmp_path, svd_method):
    want = _model()
    sk.compress(want, "svd", rank=6, svd_method=svd_method)
    cold, warm = sk.SpectrumCache(tmp_path), sk.SpectrumCache(tmp_path)
    first, second = _model(), _model()
    sk.compress(first, "svd", rank=6, svd_method=svd_method, cache=cold)
    report = sk.compress(second, "svd", rank=6, svd_method=svd_method, cache=warm)
    _assert_bitwise(_state(first), _state(want))
    _assert_bitwise(_state(second), _state(want))
    # per layer two entries: its spectrum and the factors of the rank kept
    assert (cold.stats.misses, cold.stats.hits) == (6, 0) and (warm.stats.hits, warm.stats.misses) == (6, 0)
    assert report.ranks == {"0": 6, "2": 6, "4": 6}
    again = _model()  # another rank: the spectra are served, the factors of rank 4 computed
    sk.compress(again, "svd", rank=4, svd_method=svd_method, cache=warm)
    fresh = _model()
    sk.compress(fresh, "svd", rank=4, svd_method=svd_method)
    _assert_bitwise(_state(again), _state(fresh))
    assert (warm.stats.hits, warm.stats.misses) == (9, 3)
    other = sk.SpectrumCache(tmp_path)  # another svd_method is another key: never served this one's entries
    sk.compress(_model(), "svd", rank=6, svd_method="gram" if svd_method == "exact" else "exact", cache=other)
    assert other.stats.hits == 0 and other.stats.misses == 6


def test_compress_other_methods_warn_once_and_leave_the_cache_alone(tmp_path):
    batches = [torch.randn(8, 24) for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sk.compress(_model(), "svd-llm", rank=6, calibration=batches, cache=tmp_path)
    assert sum(issubclass(w.category, CompressionWarning) and "only method 'svd'" in str(w.message)
               for w in caught) == 1
    assert not (tmp_path / "index.json").exists()
    with pytest.raises(SpectrakitError, match="expected a folder path or a spectrakit.SpectrumCache"):
        sk.compress(_model(), "svd", rank=6, cache=3)


@pytest.mark.parametrize("method", ["pissa", "milora", "svfit", "sorsa"])
def test_adapt_cached_tensors_equal_uncached(tmp_path, method):
    want = _adapted(method)
    cold, warm = sk.SpectrumCache(tmp_path), sk.SpectrumCache(tmp_path)
    _assert_bitwise(_adapted(method, cold), want)
    _assert_bitwise(_adapted(method, warm), want)
    assert (cold.stats.misses, cold.stats.hits, cold.stats.writes) == (3, 0, 3)
    assert (warm.stats.hits, warm.stats.misses, warm.stats.writes) == (3, 0, 0)


def test_adapt_keys_keep_computations_apart(tmp_path):
    """Top and bottom triplets, svd methods and dtypes of the same weight never serve each other."""
    cache = sk.SpectrumCache(tmp_path)
    _adapted("pissa", cache)
    for method, options in (("milora", {}), ("pissa", {"svd_method": "gram"})):
        before = cache.stats.misses
        _assert_bitwise(_adapted(method, cache, **options), _adapted(method, **options))
        assert cache.stats.misses == before + 3
    half = _model().to(torch.bfloat16)  # a bf16 base: its bytes and dtype differ, its adapters are fp32
    reference = sk.adapt(copy.deepcopy(half), "pissa", rank=4)
    before = cache.stats.misses
    _assert_bitwise(_state(sk.adapt(half, "pissa", rank=4, cache=cache)), _state(reference))
    assert cache.stats.misses == before + 3
    svft_before = cache.stats.hits  # svft asks for pissa's top triplets (krylov, fp32): the same entries
    _assert_bitwise(_adapted("svft", cache), _adapted("svft"))
    assert cache.stats.hits == svft_before + 3


def test_adapt_under_use_cache_block_and_refusal_of_a_bad_cache(tmp_path):
    want = _adapted("pissa")
    with use_cache(tmp_path) as cache:  # adapt(cache=None) inside the block uses the block's cache
        _assert_bitwise(_adapted("pissa"), want)
        _assert_bitwise(_adapted("pissa"), want)
    assert cache is not None and (cache.stats.misses, cache.stats.hits) == (3, 3)
    model = _model()
    with pytest.raises(SpectrakitError, match="expected a folder path"):
        sk.adapt(model, "pissa", rank=4, cache=object())
    assert all(p.requires_grad for p in model.parameters())  # refused before the model was touched


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_adapt_keys_with_the_constructor_hash_equal_a_fresh_hash(tmp_path, monkeypatch, kind):
    """Inside adapt() the key reuses the adapter's base fingerprint (one SHA-256 pass, not two);
    the key is the one a fresh hash of the weight gives (a layer built outside adapt hits it)."""
    if kind == "linear":
        model = _model()
        layer_of = lambda m: m[2]  # noqa: E731
    else:
        transformers = pytest.importorskip("transformers")
        config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
        model = transformers.GPT2LMHeadModel(config).eval()
        layer_of = lambda m: m.transformer.h[0].attn.c_attn  # noqa: E731
        assert type(layer_of(model)).__name__ == "Conv1D"
    layer = layer_of(model)
    stored = layer.weight.T if kind == "conv1d" else layer.weight  # out × in, as factors sees it
    assert content_fingerprint(stored) == f"{fingerprint(layer.weight)}-{'T' if kind == 'conv1d' else 'C'}"
    fresh, changed = copy.deepcopy(model), copy.deepcopy(model)
    calls = []
    original = sk.cache.content_fingerprint
    monkeypatch.setattr(sk.cache, "content_fingerprint", lambda W: calls.append(1) or original(W))
    cache = sk.SpectrumCache(tmp_path)
    sk.adapt(model, "pissa", rank=4, cache=cache)
    assert calls == [] and cache.stats.misses > 0  # every key from the constructors' hashes
    with use_cache(cache):  # outside adapt(): hashed afresh, the same key
        get_method("pissa")(layer_of(fresh), rank=4, name="x")
    assert len(calls) == 1 and cache.stats.hits == 1
    layer_of(changed).weight.data[0, 0] += 1.0  # through .data: no version counter sees it
    with use_cache(cache):
        get_method("pissa")(layer_of(changed), rank=4, name="x")
    assert cache.stats.hits == 1 and len(calls) == 2  # a miss: the changed weight was hashed again


# ----- a changed weight misses ----------------------------------------------------------------------

def test_weight_changed_in_place_is_a_miss_not_a_stale_entry(tmp_path):
    cache = sk.SpectrumCache(tmp_path)
    _adapted("pissa", cache)
    first = _model()
    sk.compress(first, "svd", rank=6, cache=cache)
    misses, hits = cache.stats.misses, cache.stats.hits

    changed = _model()
    with torch.no_grad():
        changed[2].weight[3, 5] += 1e-3  # one element of the middle layer
    fresh = copy.deepcopy(changed)
    sk.compress(fresh, "svd", rank=6)
    sk.compress(changed, "svd", rank=6, cache=cache)
    _assert_bitwise(_state(changed), _state(fresh))
    # only the changed layer recomputed (its spectrum and factors)
    assert cache.stats.misses == misses + 2 and cache.stats.hits == hits + 4
    assert not torch.equal(changed[2].up, first[2].up)

    bitflip = torch.randn(16, 8)
    flipped = bitflip.clone()
    flipped.view(torch.int32)[0, 0] ^= 1  # the lowest bit of one element
    assert content_fingerprint(bitflip) != content_fingerprint(flipped)
    assert content_fingerprint(bitflip) == content_fingerprint(bitflip.clone())
    assert content_fingerprint(bitflip.T.contiguous().T) != content_fingerprint(bitflip)  # layout is marked


# ----- damaged files: one line, recomputed ------------------------------------------------------------

def _fill(folder: Path) -> dict[str, torch.Tensor]:
    state = _adapted("pissa", sk.SpectrumCache(folder))
    assert len(_shards(folder)) == 3
    return state


def test_shard_cut_short_is_refused_with_one_line_and_recomputed(tmp_path):
    want = _fill(tmp_path)
    shard = _shards(tmp_path)[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # cut mid-write
    cache = sk.SpectrumCache(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _adapted("pissa", cache)
    lines = _cache_lines(caught)
    assert len(lines) == 1 and str(shard) in lines[0] and "bytes where the index lists" in lines[0]
    _assert_bitwise(got, want)
    assert (cache.stats.hits, cache.stats.misses, cache.stats.refused, cache.stats.writes) == (2, 1, 1, 1)
    assert not shard.exists() and len(_shards(tmp_path)) == 3  # the refused shard replaced by a whole one
    again = sk.SpectrumCache(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        _assert_bitwise(_adapted("pissa", again), want)
    assert again.stats.hits == 3 and again.stats.misses == 0


def test_shard_garbled_at_full_length_is_refused_by_its_hash(tmp_path):
    want = _fill(tmp_path)
    shard = _shards(tmp_path)[0]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # a byte of the tensors, same size
    shard.write_bytes(bytes(data))
    cache = sk.SpectrumCache(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _assert_bitwise(_adapted("pissa", cache), want)
    lines = _cache_lines(caught)
    assert len(lines) == 1 and str(shard) in lines[0] and "do not match the hash" in lines[0]


def test_index_cut_short_is_refused_with_one_line_and_recomputed(tmp_path):
    want = _fill(tmp_path)
    index = tmp_path / "index.json"
    text = index.read_text()
    index.write_text(text[: len(text) // 2])
    cache = sk.SpectrumCache(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _adapted("pissa", cache)
    lines = _cache_lines(caught)
    assert len(lines) == 1 and str(index) in lines[0] and "not a readable index" in lines[0]
    _assert_bitwise(got, want)
    assert (cache.stats.misses, cache.stats.hits, cache.stats.writes) == (3, 0, 3)
    listed = {tmp_path / entry["file"] for entry in json.loads(index.read_text())["entries"].values()}
    assert set(_shards(tmp_path)) == listed and len(listed) == 3  # the old index's shards removed
    again = sk.SpectrumCache(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        _assert_bitwise(_adapted("pissa", again), want)
    assert again.stats.hits == 3


def test_what_a_killed_writer_leaves_is_never_read(tmp_path):
    want = _fill(tmp_path)
    index = tmp_path / "index.json"
    listed = index.read_text()
    # killed while writing: temporary files cut short beside the shards and the index (atomic_write's names)
    shard = _shards(tmp_path)[0]
    (shard.parent / f".{shard.stem}-k9-dead.safetensors.abc123.tmp").write_bytes(shard.read_bytes()[:40])
    (tmp_path / ".index.json.def456.tmp").write_text(listed[:30])
    cache = sk.SpectrumCache(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)  # nothing to refuse: the temporary files are not looked at
        _assert_bitwise(_adapted("pissa", cache), want)
    assert cache.stats.hits == 3 and cache.stats.misses == 0

    # killed between the rename of a whole shard and the index update: a shard nothing lists
    sk.compress(_model(), "svd", rank=6, cache=sk.SpectrumCache(tmp_path))
    unlisted = sorted(set(_shards(tmp_path)) - {tmp_path / e["file"] for e in json.loads(listed)["entries"].values()})
    assert len(unlisted) == 6  # three layers' spectra and factors
    index.write_text(listed)  # the index as it was before those writes
    cache = sk.SpectrumCache(tmp_path)
    want_compressed = _model()
    sk.compress(want_compressed, "svd", rank=6)
    got = _model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sk.compress(got, "svd", rank=6, cache=cache)
    lines = _cache_lines(caught)
    assert len(lines) == 6 and all("not listed in the index" in line for line in lines)
    assert sorted(line.split(": ")[1] for line in lines) == [str(path) for path in unlisted]
    _assert_bitwise(_state(got), _state(want_compressed))
    assert cache.stats.misses == 6 and cache.stats.hits == 0


# ----- k' ≤ k ---------------------------------------------------------------------------------------------

def test_an_entry_for_k_serves_every_smaller_k(tmp_path):
    W = torch.randn(30, 20, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    cache = sk.SpectrumCache(tmp_path)
    cache.svd(W, 8, compute=lambda: (U[:, :8], S[:8], Vh[:8]), method="test")
    cache.svd(W, 8, compute=lambda: (U[:, -8:], S[-8:], Vh[-8:]), method="test", which="bottom")

    def never():
        raise AssertionError("computed although the cache holds more triplets")

    for k in (1, 3, 8):
        top, bottom = cache.svd(W, k, compute=never, method="test"), cache.svd(W, k, compute=never, method="test",
                                                                                    which="bottom")
        for got, want in zip(top, (U[:, :k], S[:k], Vh[:k])):
            assert torch.equal(got, want)
        for got, want in zip(bottom, (U[:, 12:20][:, 8 - k:], S[12:20][8 - k:], Vh[12:20][8 - k:])):
            assert torch.equal(got, want)
    assert cache.stats.hits == 6 and cache.stats.misses == 2
    bigger = cache.svd(W, 10, compute=lambda: (U[:, :10], S[:10], Vh[:10]), method="test")  # more: recomputed
    assert cache.stats.misses == 3 and torch.equal(bigger[1], S[:10]) and len(cache) == 2  # the k=8 entry replaced
    assert len(_shards(tmp_path)) == 2


def test_adapt_rank_below_a_cached_one(tmp_path):
    cache = sk.SpectrumCache(tmp_path)
    _adapted("milora", cache, rank=6)
    _adapted("pissa", cache, rank=6)
    hits = cache.stats.hits
    # bottom triplets come from one whole exact SVD: the trailing 3 of 6 are exactly what rank 3 computes
    _assert_bitwise(_adapted("milora", cache, rank=3), _adapted("milora", rank=3))
    # top triplets (block Krylov): rank 3 gets the leading 3 of the rank-6 computation
    pissa = _adapted("pissa", cache, rank=3)
    assert cache.stats.hits == hits + 6 and cache.stats.misses == 6
    base = _model()[0].weight.detach()
    U, S, Vh = singular_factors(base, 6)
    root = S[:3].sqrt()
    assert torch.equal(pissa["0.lora_A"], root[:, None] * Vh[:3])
    assert torch.equal(pissa["0.lora_B"], U[:, :3] * root[None, :])


# ----- checkpoint folders (what bench/scale.py calls) --------------------------------------------------

def test_low_memory_compress_and_adapter_init_take_a_cache(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    cache = sk.SpectrumCache(tmp_path / "cache")
    sk.compress(tmp_path / "model", "svd", ratio=0.3, low_memory=True, out=tmp_path / "a", cache=cache)
    sk.compress(tmp_path / "model", "svd", ratio=0.3, low_memory=True, out=tmp_path / "b", cache=cache)
    assert cache.stats.misses == cache.stats.hits == 28  # 2 blocks of 7 layers: spectra and factors
    from safetensors.torch import load_file

    for a in sorted((tmp_path / "a").glob("*.safetensors")):
        _assert_bitwise(load_file(str(tmp_path / "b" / a.name)), load_file(str(a)))
    for out in ("p1", "p2"):
        init_from_checkpoint(tmp_path / "model", "pissa", rank=4, out=tmp_path / out, cache=cache)
    assert cache.stats.misses == cache.stats.hits == 42
    _assert_bitwise(load_file(str(tmp_path / "p2" / "adapter.safetensors")),
                    load_file(str(tmp_path / "p1" / "adapter.safetensors")))

    from spectrakit.cli import main  # the same from the command line: all hits in the folder filled above

    for args in (["compress", str(tmp_path / "model"), "--method", "svd", "--low-memory", "--ratio", "0.3"],
                 ["adapter-init", str(tmp_path / "model"), "--method", "pissa", "--rank", "4"]):
        capsys.readouterr()
        assert main([*args, "--out", str(tmp_path / args[0]), "--cache", str(tmp_path / "cache")]) == 0
        err = capsys.readouterr().err
        assert f"spectrum cache {tmp_path / 'cache'}: " in err and ", 0 misses, 0 written, 0 refused" in err, args[0]
        assert " 0 hits" not in err
    _assert_bitwise(load_file(str(tmp_path / "adapter-init" / "adapter.safetensors")),
                    load_file(str(tmp_path / "p1" / "adapter.safetensors")))


# ----- the command line -----------------------------------------------------------------------------------

def test_cli_cache_on_analyze_compress_and_finetune(tmp_path, capsys):
    from safetensors.torch import load_file

    from spectrakit.cli import main

    cache = tmp_path / "cache"
    small = {
        "analyze": ["analyze", "--no-farms", "--no-html"],
        "compress": ["compress", "--method", "svd", "--ratio", "0.3"],
        "finetune": ["finetune", "--method", "pissa", "--rank", "4", "--steps", "1", "--batch-size", "2",
                     "--seq-len", "16", "--eval-windows", "2"],
    }
    outputs = {"analyze": "spectra.csv", "compress": "model.safetensors", "finetune": "adapter.safetensors"}
    for verb, args in small.items():
        lines = []
        for run in ("cold", "warm", "plain"):
            extra = [] if run == "plain" else ["--cache", str(cache)]
            assert main([*args, "--out", str(tmp_path / verb / run), *extra]) == 0
            lines.append([line for line in capsys.readouterr().err.splitlines() if line.startswith("spectrum cache")])
        assert lines[2] == []
        ((cold,), (warm,)) = lines[:2]
        assert cold.startswith(f"spectrum cache {cache}: 0 hits, ") and " 0 misses" not in cold, verb
        hits = int(warm.split(": ")[1].split(" hits")[0])
        assert hits > 0 and ", 0 misses, 0 written, 0 refused" in warm, verb
        name = outputs[verb]
        if name.endswith(".csv"):
            assert (tmp_path / verb / "warm" / name).read_text() == (tmp_path / verb / "plain" / name).read_text()
        else:
            _assert_bitwise(load_file(str(tmp_path / verb / "warm" / name)),
                            load_file(str(tmp_path / verb / "plain" / name)))
    assert main(["compress", "--method", "svd", "--ratio", "0.3", "--out", str(tmp_path / "q"), "--quiet",
                 "--cache", str(cache)]) == 0
    assert "spectrum cache" not in capsys.readouterr().err  # --quiet: no closing line
