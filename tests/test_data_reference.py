"""Real-data splits (spectrakit.data) and the bundled reference model (spectrakit.reference)."""

from __future__ import annotations

import math
import platform

import pytest
import torch
import torch.nn.functional as F

from spectrakit import data, reference
from spectrakit.errors import SpectrakitError

# ---------------------------------------------------------------- data splits


def test_code_splits_disjoint_deterministic_and_nonempty():
    train, val = data.code_files("train"), data.code_files("validation")
    assert train == data.code_files("train") and val == data.code_files("validation")
    assert val and len(train) > 10 * len(val)
    assert not set(train) & set(val)
    root = data.stdlib_root()
    rel = [p.relative_to(root).as_posix() for p in train + val]
    for forbidden in ("site-packages", "test", "tests", "idlelib", "pydoc_data"):
        assert not any(forbidden in r.split("/")[:-1] for r in rel), forbidden
    assert all(r.endswith(".py") for r in rel)
    assert [p.relative_to(root).as_posix() for p in train] == sorted(rel[: len(train)])
    # returned lists are copies: mutating one must not change the next call
    train.clear()
    assert data.code_files("train")


def test_code_corpus_deterministic_and_truncated():
    val = data.code_corpus("validation")
    assert val == data.code_corpus("validation")
    assert len(val) > 100_000
    assert data.code_corpus("validation", max_bytes=1234) == val[:1234]
    first = data.code_files("validation")[0].read_bytes()
    assert val.startswith(first + data.SEPARATOR)


def test_docs_split_disjoint_complete_deterministic():
    from pydoc_data.topics import topics

    train, val = data.docs_corpus("train"), data.docs_corpus("validation")
    assert val and train
    assert train == data.docs_corpus("train") and val == data.docs_corpus("validation")
    # every topic is in exactly one split: sizes add up exactly
    total = sum(len(v.encode("utf-8")) for v in topics.values())
    n_sep = len(topics) - 2  # (n_train - 1) + (n_val - 1)
    assert len(train) + len(val) == total + n_sep * len(data.SEPARATOR)
    val_keys = [k for k in sorted(topics) if topics[k].encode("utf-8") in val]
    assert val_keys and all(topics[k].encode("utf-8") not in train for k in val_keys)


def test_digits_split():
    pytest.importorskip("sklearn")
    Xtr, ytr = data.digits("train")
    Xva, yva = data.digits("validation")
    assert Xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert Xtr.shape[1] == 64 and Xtr.shape[0] + Xva.shape[0] == 1797
    assert 0.0 <= float(Xtr.min()) and float(Xtr.max()) <= 1.0
    assert set(ytr.tolist()) == set(range(10)) == set(yva.tolist())
    Xtr2, ytr2 = data.digits("train")
    assert torch.equal(Xtr, Xtr2) and torch.equal(ytr, ytr2)
    # no image appears in both splits (digits has a few duplicates, so compare counts)
    rows_tr = {tuple(r) for r in Xtr.tolist()}
    overlap = sum(tuple(r) in rows_tr for r in Xva.tolist())
    assert overlap <= 5


@pytest.mark.parametrize(
    "call",
    [
        lambda: data.code_files("val"),
        lambda: data.code_corpus("test"),
        lambda: data.docs_corpus("TRAIN"),
        lambda: data.digits("valid"),
    ],
)
def test_bad_split_name_raises(call):
    with pytest.raises(SpectrakitError) as info:
        call()
    message = str(info.value)
    assert "split" in message and "\n" not in message


# ---------------------------------------------------------------- batching


def test_byte_batches_seeded_and_real_windows():
    corpus = data.code_corpus("validation", max_bytes=50_000)
    a = list(data.byte_batches(corpus, batch_size=4, seq_len=32, seed=7, steps=3))
    b = list(data.byte_batches(corpus, batch_size=4, seq_len=32, seed=7, steps=3))
    c = list(data.byte_batches(corpus, batch_size=4, seq_len=32, seed=8, steps=3))
    assert len(a) == 3 and all(x.shape == (4, 33) and x.dtype == torch.long for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    for row in a[0]:
        assert bytes(row.tolist()) in corpus
    # the global RNG is not used
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    next(iter(data.byte_batches(corpus, 2, 8, seed=1)))
    assert torch.equal(torch.rand(1), expected)


def test_byte_batches_too_short_raises():
    with pytest.raises(SpectrakitError):
        next(iter(data.byte_batches(b"abc", batch_size=1, seq_len=8)))


def test_eval_windows_deterministic_non_overlapping():
    # a string whose every even offset is identifiable: 2-byte big-endian counter
    corpus = b"".join(i.to_bytes(2, "big") for i in range(5000))  # 10,000 bytes
    w = data.eval_windows(corpus, seq_len=63, max_windows=20)
    assert w.shape == (20, 64) and w.dtype == torch.long
    assert torch.equal(w, data.eval_windows(corpus, seq_len=63, max_windows=20))
    starts = [2 * ((int(r[0]) << 8) | int(r[1])) for r in w]
    for row, s in zip(w, starts):
        assert corpus[s : s + 64] == bytes(row.tolist())  # a real slice
    assert all(b - a >= 64 for a, b in zip(starts, starts[1:]))  # increasing, no overlap
    assert starts[-1] > 0.9 * len(corpus)  # spread over the whole string
    assert data.eval_windows(corpus, 63).shape[0] == len(corpus) // 64
    with pytest.raises(SpectrakitError):
        data.eval_windows(b"short", seq_len=63)


# ---------------------------------------------------------------- reference model


def test_encode_decode_round_trip_non_ascii():
    text = "naïve café — ∑ 日本語 🐍\n\tdef f(x): return x"
    ids = reference.encode(text)
    assert ids.dtype == torch.long and ids.shape == (len(text.encode("utf-8")),)
    assert int(ids.min()) >= 0 and int(ids.max()) <= 255
    assert reference.decode(ids) == text
    assert reference.decode(ids.tolist()) == text
    assert reference.encode(text.encode("utf-8")).tolist() == ids.tolist()
    assert reference.decode([0xE6, 0x97]) == "\ufffd"  # truncated UTF-8 is replaced, not raised
    with pytest.raises(SpectrakitError):
        reference.decode([300])


def test_reference_files_shipped():
    assert reference.reference_weights_path().is_file()
    cfg = reference.reference_config()
    assert cfg["vocab_size"] == 256 and cfg["model_type"] == "llama"
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    assert cfg["tie_word_embeddings"] is False
    info = reference.reference_info()
    for key in ("command", "seed", "steps", "val_bpb_code", "unigram_bpb_code", "val_bpb_docs", "parameters"):
        assert key in info, key
    assert info["val_bpb_code"] < info["unigram_bpb_code"] - 1.0  # clearly better than unigram


def test_reference_weights_are_float32_safetensors():
    from safetensors.torch import load_file

    state = load_file(str(reference.reference_weights_path()))
    assert state and all(t.dtype == torch.float32 for t in state.values())
    assert sum(t.numel() for t in state.values()) == reference.reference_info()["parameters"]


def _bits_per_byte(model, windows: torch.Tensor, batch_size: int = 32) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch_size):
            x = windows[i : i + batch_size]
            logits = model(input_ids=x[:, :-1]).logits.float()
            total += F.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1), reduction="sum").item()
            count += x[:, 1:].numel()
    return total / count / math.log(2)


def test_reference_model_beats_unigram_and_matches_record():
    pytest.importorskip("transformers")
    rng = torch.get_rng_state()
    model = reference.reference_model()
    assert torch.equal(rng, torch.get_rng_state())  # loading does not move the global RNG
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert next(model.parameters()).dtype == torch.float32

    info = reference.reference_info()
    windows = data.eval_windows(data.code_corpus("validation"), info["seq_len"], info["eval_windows"])
    bpb = _bits_per_byte(model, windows)
    assert bpb < info["unigram_bpb_code"]
    if platform.python_version() != info["python_version"]:
        pytest.skip(f"stdlib of Python {platform.python_version()} differs from {info['python_version']} "
                    "used in training")
    assert abs(bpb - info["val_bpb_code"]) < 0.05, (bpb, info["val_bpb_code"])


def test_reference_model_predicts_code():
    pytest.importorskip("transformers")
    model = reference.reference_model()
    ids = reference.encode("import os\nimport sys\n\n\ndef main():\n    ")[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 256)
    # after "import sy" the model should expect "s"
    prefix = reference.encode("import os\nimport sy")[None]
    with torch.no_grad():
        nxt = int(model(input_ids=prefix).logits[0, -1].argmax())
    assert reference.decode([nxt]) == "s"
